# The common start of a benchmark (sourced): helpers, the slotstream binary, a work directory
# removed on exit (kept with KEEP=1), and a throwaway PostgreSQL with wal_level=logical.
#
#   source bench/lib.sh
#   bench_start window        # sets $root, $bin, $work; starts PostgreSQL ($PGT_PORT, pgt_psql)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/pg-throwaway.sh

say() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }

apt_install() {
    apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}

bench_cleanup() {
    # A benchmark with processes of its own defines bench_extra_cleanup to stop them.
    if declare -F bench_extra_cleanup >/dev/null; then bench_extra_cleanup; fi
    pgt_stop
    if [[ -n "${KEEP:-}" ]]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}

bench_start() {
    local name=$1
    command -v bc >/dev/null || { say "installing bc"; apt_install bc; }
    if [[ -n "${SLOTSTREAM_BIN:-}" ]]; then
        bin="$SLOTSTREAM_BIN"
    else
        say "cargo build --release"
        cargo build --release --quiet
        bin="${CARGO_TARGET_DIR:-$root/target}/release/slotstream"
    fi
    work="$(mktemp -d "/tmp/slotstream-bench-$name.XXXXXX")"
    chmod 755 "$work"
    trap bench_cleanup EXIT
    say "throwaway PostgreSQL (wal_level=logical)"
    pg_throwaway_start "$work/pg"
}

# Applies sql/setup.sql to database `app` for public.users: role rudder with a fresh password
# (exported as SLOTSTREAM_PG_PASSWORD) and publication $pub.
bench_publish() {
    export SLOTSTREAM_PG_PASSWORD="bench-$RANDOM-$RANDOM"
    pub=slotstream_bench
    pgt_psql -d app -v schema=public -v table=users -v user=rudder \
        -v password="$SLOTSTREAM_PG_PASSWORD" -v publication="$pub" -f sql/setup.sql >/dev/null
}

# Database `app` with the 10-column public.users table of the destination benchmarks, published
# (bench_publish).
bench_users_table() {
    pgt_psql -d postgres -c "CREATE DATABASE app"
    pgt_psql -d app <<'SQL'
CREATE TABLE public.users (
    id         bigserial PRIMARY KEY,
    user_id    text,
    email      text,
    name       text,
    plan       text,
    age        integer,
    balance    numeric(12,2),
    verified   boolean,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);
SQL
    bench_publish
}

# Inserts $1 rows into the table of bench_users_table in $2-row transactions, then updates the first $3
# rows (same transaction size): the changes the destination benchmarks read.
bench_load_users() {
    pgt_psql -d app -v rows="$1" -v txn="$2" -v upd="$3" <<'SQL' >/dev/null
CREATE PROCEDURE bench_load(n bigint, txn bigint, upd bigint) LANGUAGE plpgsql AS $$
DECLARE
    lo bigint := 1;
BEGIN
    WHILE lo <= n LOOP
        INSERT INTO public.users (user_id, email, name, plan, age, balance, verified, updated_at)
        SELECT 'u_' || i, 'user' || i || '@example.com', 'User ' || i,
               (ARRAY['free', 'pro', 'team', 'enterprise'])[1 + i % 4], 18 + i % 60,
               (i % 100000) / 100.0, i % 3 = 0, now()
          FROM generate_series(lo, least(lo + txn - 1, n)) AS i;
        COMMIT;
        lo := lo + txn;
    END LOOP;
    lo := 1;
    WHILE lo <= upd LOOP
        UPDATE public.users SET plan = 'pro', updated_at = now()
         WHERE id BETWEEN lo AND least(lo + txn - 1, upd);
        COMMIT;
        lo := lo + txn;
    END LOOP;
END $$;
CALL bench_load(:rows, :txn, :upd);
SQL
}

# The [source] section of a bench pipeline's config (after bench_publish), on stdout.
bench_source_toml() {
    cat <<TOML
[source]
host = "127.0.0.1"
port = $PGT_PORT
database = "app"
user = "rudder"
password_env = "SLOTSTREAM_PG_PASSWORD"
sslmode = "disable"
table = "users"
publication = "$pub"
TOML
}
