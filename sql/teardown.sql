-- slotstream: undo sql/setup.sql. Run `slotstream teardown --config FILE` first, which drops
-- the replication slot and this pipeline's state rows; then, as a superuser:
--
--   psql -v schema=public -v table=users -v user=rudder \
--        -v publication=slotstream_users_to_rudder -f sql/teardown.sql
--
-- The _rudderstack schema is kept when other pipelines still have state in it; pass
-- -v drop_state=1 to drop it with everything in it.

\set ON_ERROR_STOP on
\if :{?user}
\else
  \set user rudder
\endif

DROP PUBLICATION IF EXISTS :"publication";

-- A slot left behind pins WAL forever: drop every inactive slot that slotstream's state names.
SELECT to_regclass('"_rudderstack".cdc_checkpoints') IS NOT NULL AS has_state \gset
\if :has_state
SELECT pg_drop_replication_slot(slot_name)
  FROM pg_replication_slots
 WHERE NOT active AND slot_name IN (SELECT slot FROM "_rudderstack".cdc_checkpoints);
\endif

\if :{?drop_state}
DROP SCHEMA IF EXISTS "_rudderstack" CASCADE;
\else
REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA "_rudderstack" FROM :"user";
REVOKE ALL ON SCHEMA "_rudderstack" FROM :"user";
\endif

REVOKE SELECT ON ALL TABLES IN SCHEMA :"schema" FROM :"user";
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema" REVOKE SELECT ON TABLES FROM :"user";
REVOKE USAGE ON SCHEMA :"schema" FROM :"user";
ALTER ROLE :"user" WITH NOREPLICATION;
DROP OWNED BY :"user";
DROP USER :"user";
