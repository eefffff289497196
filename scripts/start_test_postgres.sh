#!/usr/bin/env bash
# A throw-away PostgreSQL server for the store tests, on 127.0.0.1. Idempotent.
#
# usage: scripts/start_test_postgres.sh [start|stop|status|url] [DIR]
#
#   start   (default) initdb DIR/data if missing, start the server if it is not running,
#           create the database, and print its URL on stdout (nothing else goes there):
#               export RECSYS_TEST_POSTGRES_URL=$(scripts/start_test_postgres.sh)
#   stop    stop the server (fast shutdown); the cluster stays in DIR for the next start
#   status  exit 0 if the server is running, 3 if not
#   url     print the URL (the server is not started)
#
#   DIR     cluster folder (default: recsys-pg-test-<hash of the repo path> in $TMPDIR or
#           /tmp: the server runs as an unprivileged user when this script runs as root,
#           and a checkout under a private folder such as /root would be out of its reach)
#
# Environment:
#   PGTEST_PORT  TCP port (default: the port this cluster used last time if still free,
#                else a free one)
#   PGTEST_DB    database name (default recsys_test)
#   PGTEST_USER  OS user that runs the server when this script runs as root (postgres
#                refuses to run as root); created if missing (default postgres)
#   PG_BIN       folder with initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin,
#                else from PATH). Install on Debian: apt-get install -y postgresql
#
# The cluster trusts every local TCP connection and runs with fsync off: it is for tests
# only, never for data you want to keep.
set -euo pipefail

action=${1:-start}
case "$action" in
  start | stop | status | url) shift || true ;;
  -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
  *) action=start ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${TMPDIR:-/tmp}/recsys-pg-test-$(printf '%s' "$repo" | sha256sum | cut -c1-8)}
mkdir -p "$dir"
chmod 755 "$dir"
dir=$(cd "$dir" && pwd)
data=$dir/data
db=${PGTEST_DB:-recsys_test}
superuser=postgres

log() { echo "[pg-test] $*" >&2; }

find_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local newest
  newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$newest" ] && [ -x "$newest/pg_ctl" ]; then echo "$newest"; return; fi
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v pg_ctl)"; return; fi
  log "PostgreSQL server binaries not found (initdb, pg_ctl): apt-get install -y postgresql, or set PG_BIN"
  exit 2
}
bin=$(find_bin)

# as root, run server-side commands as an unprivileged user
run_as=()
if [ "$(id -u)" = 0 ]; then
  user=${PGTEST_USER:-postgres}
  if ! id "$user" >/dev/null 2>&1; then
    log "creating system user $user"
    useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
  fi
  chown "$user" "$dir"
  [ -d "$data" ] && chown -R "$user" "$data"
  run_as=(runuser -u "$user" --)
fi
pg() { "${run_as[@]}" "$@"; }

is_running() { pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; }

port_is_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

choose_port() {
  if [ -n "${PGTEST_PORT:-}" ]; then echo "$PGTEST_PORT"; return; fi
  if [ -f "$dir/port" ] && port_is_free "$(cat "$dir/port")"; then cat "$dir/port"; return; fi
  local p
  for p in $(seq 55432 55532); do
    if port_is_free "$p"; then echo "$p"; return; fi
  done
  log "no free port in 55432-55532; set PGTEST_PORT"
  exit 2
}

url() { echo "postgresql+psycopg://$superuser@127.0.0.1:$(cat "$dir/port")/$db"; }

case "$action" in
  status)
    if is_running; then log "running on port $(cat "$dir/port")"; exit 0; fi
    log "not running"; exit 3 ;;
  stop)
    if is_running; then pg "$bin/pg_ctl" -D "$data" -m fast -w stop >&2; else log "not running"; fi
    exit 0 ;;
  url)
    [ -f "$dir/port" ] || { log "never started: run $0 start"; exit 3; }
    url; exit 0 ;;
esac

start=$(date +%s)
if [ ! -f "$data/PG_VERSION" ]; then
  log "initdb $data ($("$bin/postgres" --version))"
  pg "$bin/initdb" -D "$data" -U "$superuser" --auth=trust --encoding=UTF8 --no-locale \
    --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
  cat >>"$data/postgresql.conf" <<'EOF'

# --- scripts/start_test_postgres.sh: a test cluster, speed over durability ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 100
EOF
fi

if is_running; then
  log "already running on port $(cat "$dir/port")"
else
  port=$(choose_port)
  echo "$port" >"$dir/port"
  log "starting on 127.0.0.1:$port"
  pg "$bin/pg_ctl" -D "$data" -l "$dir/postgres.log" -o "-p $port" -w -t 60 start >&2 \
    || { tail -n 20 "$dir/postgres.log" >&2; exit 1; }
fi

port=$(cat "$dir/port")
psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U "$superuser" -d postgres -v ON_ERROR_STOP=1 -tAq)
if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
  log "creating database $db"
  "${psql[@]}" -c "CREATE DATABASE \"$db\""
fi
log "ready in $(( $(date +%s) - start )) s"
url
