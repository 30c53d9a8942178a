#!/usr/bin/env bash
# Installs and starts what the test suites need, so `make test` works on a fresh machine
# (which has only the Rust toolchain, gcc and python3). Quick when everything is there: it
# only installs what is missing. Run by `make test` (target `deps`) and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in make g++ valgrind curl chromium psql:postgresql-client socat pkg-config \
  node:nodejs npm redis-server:redis-server redis-cli:redis-tools nats-server:nats-server; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
# log-fanout-test's clients need OpenBSD nc (for -U); uv_embed needs libuv through pkg-config.
[[ "$(nc -h 2>&1 || true)" == *OpenBSD* ]] || missing+=(netcat-openbsd)
pkg-config --exists libuv 2>/dev/null || missing+=(libuv1-dev)
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
if ((${#missing[@]})); then
  echo "test-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# ws-chat-test: Python's websockets client, and playwright-core (driving /usr/bin/chromium).
python3 -c 'import websockets.asyncio.client' 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check 'websockets>=14,<18'
[ -d tests/browser/node_modules/playwright-core ] ||
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

# The Redis and NATS brokers' tests need their servers (FDCAST_REDIS_URL, FDCAST_NATS_URL);
# (the Redis Cluster test starts three redis-server of its own, and needs redis-cli);
# a missing server fails them, so start any that is down.
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
for port in 6379 4222; do
  for _ in $(seq 30); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.5; done
done

# The PostgreSQL backend's tests need the server (FDCAST_PG_URL, default
# postgresql://127.0.0.1:5432/test); a missing server fails them, so start it if it is down.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -q -h 127.0.0.1 -p 5432
# A freshly installed cluster has neither the test database nor a role for this user.
if ! psql -X -q -h 127.0.0.1 -d test -c 'select 1' >/dev/null 2>&1; then
  su postgres -c "psql -X -q -c \"DO \\\$\\\$ BEGIN CREATE ROLE \\\"$(id -un)\\\" SUPERUSER LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END \\\$\\\$\"" || true
  su postgres -c "createdb -O '$(id -un)' test" 2>/dev/null || true
fi
psql -X -q -h 127.0.0.1 -d test -c 'select 1' >/dev/null
echo "test-deps: ready"
