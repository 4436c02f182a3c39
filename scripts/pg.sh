#!/usr/bin/env bash
# A throwaway PostgreSQL server for the collector's tests (provisioning/tests/store.rs).
#
#   scripts/pg.sh          start it if needed, print its URL on stdout (nothing else goes there):
#                          postgres://postgres@127.0.0.1:55432/postgres
#   scripts/pg.sh status   exit 0 if it is running
#   scripts/pg.sh stop     stop it (fast shutdown); its data stays for the next start
#
# Installs Debian's `postgresql` package when the binaries are missing and we are root. The
# cluster lives in $EDGELORA_CACHE/pg (default ~/.cache/edgelora/pg), listens on 127.0.0.1 only,
# port $EDGELORA_PG_PORT (default 55432), unix socket inside that directory, and trusts every
# local connection: it is for tests, never for data that matters. As root, the server runs as
# the `postgres` user (PostgreSQL refuses root); if that user cannot reach the cache directory
# (root's home is usually private) the cluster goes to /var/tmp/edgelora-pg instead.
set -euo pipefail

CACHE="${EDGELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora}"
PORT="${EDGELORA_PG_PORT:-55432}"
URL="postgres://postgres@127.0.0.1:$PORT/postgres"

say() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

find_bin() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
    if [ -n "$d" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then
        echo "$d"
    elif command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        dirname "$(command -v pg_ctl)"
    fi
}

BIN="$(find_bin)"
if [ -z "$BIN" ]; then
    [ "${1:-}" = "status" ] && exit 1
    [ "${1:-}" = "stop" ] && exit 0
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed (apt-get install postgresql, as root)"
    say "installing PostgreSQL (apt-get install postgresql)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
        >/dev/null || die "could not install PostgreSQL"
    BIN="$(find_bin)"
    [ -n "$BIN" ] || die "installed PostgreSQL, but found no pg_ctl/initdb"
fi

# Who runs the server, and where its files go.
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' user to run the server"
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi
ROOT="$CACHE/pg"
mkdir -p "$ROOT"
[ "$(id -u)" -eq 0 ] && chown postgres: "$ROOT"
if ! as_pg test -w "$ROOT" 2>/dev/null; then
    rmdir "$ROOT" 2>/dev/null || true
    ROOT=/var/tmp/edgelora-pg
    mkdir -p "$ROOT"
    chown postgres: "$ROOT"
    chmod 700 "$ROOT"
    as_pg test -w "$ROOT" || die "the postgres user cannot write $ROOT"
fi
DATA="$ROOT/data"
SOCK="$ROOT/run"
LOG="$ROOT/server.log"

pg_ctl() { as_pg "$BIN/pg_ctl" -D "$DATA" "$@"; }
running() { [ -f "$DATA/PG_VERSION" ] && pg_ctl status >/dev/null 2>&1; }

case "${1:-start}" in
    status) running; exit ;;
    stop)
        if running; then pg_ctl stop -m fast -w >/dev/null || die "could not stop the server in $DATA"; fi
        exit 0
        ;;
    start) ;;
    *) die "usage: $0 [start|status|stop]" ;;
esac

if ! running; then
    if [ ! -f "$DATA/PG_VERSION" ]; then
        say "creating a throwaway cluster in $DATA"
        rm -rf "$DATA"
        as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$ROOT/initdb.log" 2>&1 || die "initdb failed, see $ROOT/initdb.log"
        cat >>"$DATA/postgresql.conf" <<EOF

# scripts/pg.sh: a test server, reachable from this host only.
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
max_connections = 200
EOF
    fi
    as_pg mkdir -p "$SOCK"
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "port $PORT is taken by another program (set EDGELORA_PG_PORT to use another one)"
    fi
    say "starting PostgreSQL ($BIN) on 127.0.0.1:$PORT, log in $LOG"
    pg_ctl start -w -t 60 -l "$LOG" -o "-p $PORT" >/dev/null || die "the server did not start, see $LOG"
fi

"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 30 || die "the server does not answer on 127.0.0.1:$PORT"
echo "$URL"
