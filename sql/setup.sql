-- slotstream: one-time setup of a PostgreSQL database for one pipeline.
--
-- Run as a superuser, or as the table owner with CREATEROLE, with psql:
--
--   psql -v schema=public -v table=users -v user=rudder -v password='<strong_unique_password>' \
--        -v publication=slotstream_users_to_rudder -f sql/setup.sql
--
-- Optional variables:
--   -v filter='deleted_at IS NULL'     row filter of the publication (PostgreSQL 15+); must match
--                                      [mapping] filter in the config
--   -v all_tables=1                    also the optional grants on every table of the schema
--
-- The statements follow the order of RudderStack's PostgreSQL source guide, then add what
-- logical replication needs: the REPLICATION attribute and a publication for the one table.
-- Every identifier is quoted (:"var"), every literal escaped (:'var'), so odd names are safe.

\set ON_ERROR_STOP on

\if :{?schema}
\else
  \echo 'setup.sql: pass -v schema=<schema of the table>'
  \quit
\endif
\if :{?table}
\else
  \echo 'setup.sql: pass -v table=<table to stream>'
  \quit
\endif
\if :{?user}
\else
  \set user rudder
\endif
\if :{?password}
\else
  \echo 'setup.sql: pass -v password=<strong unique password> for the slotstream role'
  \quit
\endif
\if :{?publication}
\else
  \echo 'setup.sql: pass -v publication=<name> (slotstream_<pipeline name> by default in the config)'
  \quit
\endif

-- 1. The role slotstream connects as.
CREATE USER :"user" WITH PASSWORD :'password';

-- 2. Look up objects in the table's schema.
GRANT USAGE ON SCHEMA :"schema" TO :"user";

-- 3. Read the table (full sync, preview).
GRANT SELECT ON TABLE :"schema".:"table" TO :"user";

-- 4. The state schema: checkpoints, sync runs, dead letters. Its name must not change.
CREATE SCHEMA IF NOT EXISTS "_rudderstack";

-- 5. Full access to the state schema (slotstream creates and migrates its tables there).
GRANT ALL ON SCHEMA "_rudderstack" TO :"user";

-- 6. Full access to the objects already in it.
GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA "_rudderstack" TO :"user";

-- Optional (as in the guide): read every table of the schema, now and in the future.
\if :{?all_tables}
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO :"user";
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema" GRANT SELECT ON TABLES TO :"user";
\endif

-- 7. Logical replication: the role may open a walsender and create its slot.
ALTER ROLE :"user" WITH REPLICATION;

-- 8. The publication of the one table (run by the table owner). With a row filter, updates
--    and deletes need the filter's columns in the replica identity (see README, "Row filter").
--    publish_via_partition_root makes the changes of a partitioned table's partitions,
--    including partitions created or attached later, arrive as changes of the table itself;
--    for a plain table it changes nothing.
\if :{?filter}
CREATE PUBLICATION :"publication" FOR TABLE :"schema".:"table" WHERE (:filter)
  WITH (publish_via_partition_root = true);
\else
CREATE PUBLICATION :"publication" FOR TABLE :"schema".:"table"
  WITH (publish_via_partition_root = true);
\endif
