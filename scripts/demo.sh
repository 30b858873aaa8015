#!/usr/bin/env bash
# slotstream end to end on a throwaway local PostgreSQL:
#   a demo `users` table → sql/setup.sql → `check` → `preview` → `run` streaming to stdout
#   while rows are inserted, updated and deleted → `status`.
# Everything it starts is stopped and removed when it exits.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/pg-throwaway.sh

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building slotstream"
cargo build --quiet
bin="$root/target/debug/slotstream"

work="$(mktemp -d /tmp/slotstream-demo.XXXXXX)"
chmod 755 "$work"
run_pid=""
cleanup() {
    [[ -n "$run_pid" ]] && kill "$run_pid" 2>/dev/null || true
    pgt_stop
    rm -rf "$work"
}
trap cleanup EXIT

step "starting a throwaway PostgreSQL with wal_level=logical"
pg_throwaway_start "$work/pg"
echo "PostgreSQL on 127.0.0.1:$PGT_PORT"

step "creating the demo table app.public.users"
pgt_psql -d postgres -c "CREATE DATABASE app"
pgt_psql -d app <<'SQL'
CREATE TABLE public.users (
    id         bigserial PRIMARY KEY,
    user_id    text,
    email      text,
    name       text,
    plan       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.users (user_id, email, name, plan) VALUES
    ('u_1', 'ann@example.com', 'Ann', 'pro'),
    ('u_2', 'bob@example.com', 'Bob', 'free'),
    (NULL,  'cy@example.com',  'Cy',  'free');
SQL

step "applying sql/setup.sql (role rudder, grants, publication)"
export SLOTSTREAM_PG_PASSWORD="demo-$(date +%s)"
pgt_psql -d app -v schema=public -v table=users -v user=rudder \
    -v password="$SLOTSTREAM_PG_PASSWORD" -v publication=slotstream_users_to_rudder -f sql/setup.sql

metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 19187)
cat > "$work/slotstream.toml" <<TOML
name = "users-to-rudder"

[source]
host = "127.0.0.1"
port = $PGT_PORT
database = "app"
user = "rudder"
password_env = "SLOTSTREAM_PG_PASSWORD"
sslmode = "disable"
table = "users"

[mapping]
columns = ["user_id", "email", "name", "plan"]
constants = { source = "postgres" }
[mapping.trait_keys]
name = "fullName"

[schedule]
frequency = "realtime"

[destination]
type = "stdout"

[metrics]
listen = "127.0.0.1:$metrics_port"
TOML
step "the config"
cat "$work/slotstream.toml"

step "slotstream check"
"$bin" check --config "$work/slotstream.toml"

step "slotstream preview --limit 2"
"$bin" preview --config "$work/slotstream.toml" --limit 2

step "slotstream run (full sync, then streaming) — events appear below"
"$bin" run --config "$work/slotstream.toml" > "$work/events.jsonl" 2> "$work/run.log" &
run_pid=$!
wait_for_lines() {
    local want=$1 i
    for i in $(seq 1 300); do
        [[ $(wc -l < "$work/events.jsonl") -ge $want ]] && return 0
        kill -0 "$run_pid" 2>/dev/null || { cat "$work/run.log"; return 1; }
        sleep 0.1
    done
    echo "timed out waiting for $want events" >&2; cat "$work/run.log" >&2; return 1
}
wait_for_lines 3
pgt_psql -d app <<'SQL'
INSERT INTO public.users (user_id, email, name, plan) VALUES ('u_4', 'dee@example.com', 'Dee', 'pro');
UPDATE public.users SET plan = 'enterprise' WHERE user_id = 'u_1';
DELETE FROM public.users WHERE user_id = 'u_2';
SQL
wait_for_lines 5
step "the running pipeline's /readyz and a few of its /metrics"
curl -s "http://127.0.0.1:$metrics_port/readyz"
curl -s "http://127.0.0.1:$metrics_port/metrics" \
    | grep -E '^slotstream_(events_delivered_total|changes_received_total|slot_lag_bytes|source_lag_seconds|ready)[ {]' || true
step "slotstream status while it runs"
"$bin" status --config "$work/slotstream.toml"
kill -TERM "$run_pid"
wait "$run_pid" || true
run_pid=""
if command -v python3 >/dev/null; then
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    print(json.dumps({k: e[k] for k in ("type", "userId", "anonymousId", "traits") if k in e}))
    print("   op=%s lsn=%s messageId=%s" % (e["context"]["sources"]["op"], e["context"]["sources"]["lsn"], e["messageId"]))
' "$work/events.jsonl"
else
    cat "$work/events.jsonl"
fi
echo "(the delete is not sent: sync.mode = \"upsert\"; set it to \"mirror\" for Record Deleted events)"

step "slotstream status"
"$bin" status --config "$work/slotstream.toml"
