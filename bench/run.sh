#!/usr/bin/env bash
# Start the system in one mode, run the REST ingest benchmark against it, stop it.
#   bench/run.sh embedded [bench args...]   # make run: SQLite, in-process worker
#   bench/run.sh pg [bench args...]         # make web + make worker + make beat on PostgreSQL + Redis
# Bench args default to: --runs 200 --spans-per-run 50 --batch 50 --concurrency 8
# Results go to bench/out/<mode>-<time>.json; server logs to bench/out/<mode>-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?embedded or pg}; shift || true
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--runs 200 --spans-per-run 50 --batch 50 --concurrency 8)
out=bench/out; mkdir -p "$out"; stamp=$(date +%Y%m%dT%H%M%S)
export PORT=${PORT:-8019} DATA_DIR=$(mktemp -d) ADMIN_PASSWORD=bench-admin-pw-1 DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 \
       ALLOWED_HOSTS=127.0.0.1,localhost SECURE_SSL_REDIRECT=0 SESSION_COOKIE_SECURE=0
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done; sleep 2;
            for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
if [ "$mode" = pg ]; then
  db=controlplane_bench
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/15}  # flushed below
  redis-cli -u "$REDIS_URL" flushdb >/dev/null
  make -s migrate
  setsid make -s web > "$out/$mode-$stamp-web.log" 2>&1 & pids+=($!)
  setsid make -s worker > "$out/$mode-$stamp-worker.log" 2>&1 & pids+=($!)
  setsid make -s beat > "$out/$mode-$stamp-beat.log" 2>&1 & pids+=($!)
else
  unset DATABASE_URL REDIS_URL
  setsid make -s run > "$out/$mode-$stamp-run.log" 2>&1 & pids+=($!)
fi
for _ in $(seq 1 120); do curl -sf "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
key=$(.venv/bin/python manage.py create_api_key --project bench --scopes ingest,read --create-project 2>/dev/null | tail -1)
.venv/bin/python bench/rest_ingest.py --url "http://127.0.0.1:$PORT" --key "$key" --json-out "$out/$mode-$stamp.json" "${args[@]}"
