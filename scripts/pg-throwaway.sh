#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for scripts (demo, benchmarks); sourced, not run.
#
#   source scripts/pg-throwaway.sh; pg_throwaway_start DIR
#
# Sets PGT_BIN, PGT_DIR, PGT_PORT, PGT_SOCK and pgt_psql/pgt_stop functions. initdb refuses
# root, so as root the cluster runs as the `postgres` OS user. wal_level=logical; fsync off.

pg_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir)"
        [[ -x "$d/initdb" ]] && { echo "$d"; return; }
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
        [[ -x "$d/initdb" ]] && { echo "$d"; return; }
    done
    echo "no PostgreSQL server binaries found: run scripts/test.sh once, or apt-get install postgresql" >&2
    return 1
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

pgt_as_owner() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_throwaway_start() {
    PGT_DIR="$1"
    shift
    PGT_BIN="$(pg_bindir)"
    PGT_PORT="$(free_port)"
    PGT_SOCK="$PGT_DIR"
    mkdir -p "$PGT_DIR"
    chmod 700 "$PGT_DIR"
    if [[ "$(id -u)" == 0 ]]; then chown postgres: "$PGT_DIR"; fi
    pgt_as_owner "$PGT_BIN/initdb" -D "$PGT_DIR/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --no-sync >/dev/null
    pgt_as_owner "$PGT_BIN/pg_ctl" -D "$PGT_DIR/data" -l "$PGT_DIR/server.log" -w -o \
        "-c port=$PGT_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$PGT_SOCK' -c wal_level=logical -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=4GB -c shared_buffers=256MB $*" \
        start >/dev/null
}

pgt_psql() {
    "$PGT_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGT_SOCK" -p "$PGT_PORT" -U postgres "$@"
}

pgt_stop() {
    [[ -n "${PGT_DIR:-}" && -d "$PGT_DIR/data" ]] || return 0
    pgt_as_owner "$PGT_BIN/pg_ctl" -D "$PGT_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PGT_DIR"
}
