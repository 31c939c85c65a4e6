#!/usr/bin/env bash
# Start the system in one mode, run one ingest benchmark against it, stop it.
#   bench/run.sh embedded [rest|otlp] [bench args...]   # make run: SQLite, in-process worker
#   bench/run.sh pg [rest|otlp] [bench args...]         # make web + make worker + make beat on PostgreSQL + Redis
# rest (the default) runs bench/rest_ingest.py; its args default to
#   --runs 200 --spans-per-run 50 --batch 50 --concurrency 8
# otlp runs ../shared/bench/otlp_load.py (OTLP_LOAD overrides the path) against /v1/traces, counting
# stored spans straight from the database (bench/span_counter.py, one connection) and watching the web,
# worker and PostgreSQL processes; its args default to
#   --traces 2000 --spans-per-trace 10 --batch 500 --concurrency 8 --seed 1
# The worker runs as `make worker` runs it (nice WORKER_NICE, default 10); WORKER_CONCURRENCY sets its
# prefork children (pg mode); SPAN_COUNT_INTERVAL how often stored
# spans are counted (0.2 s; count(*) grows with the table, so use more for long runs). Results go to
# bench/out/<mode>-<bench>-<time>.json, server logs to bench/out/<mode>-<bench>-<time>-*.log, and the
# worker's RSS every 10 s to bench/out/<mode>-<bench>-<time>-rss.log.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?embedded or pg}; shift || true
bench=rest
if [ $# -gt 0 ] && { [ "$1" = rest ] || [ "$1" = otlp ]; }; then bench=$1; shift; fi
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  if [ "$bench" = rest ]; then args=(--runs 200 --spans-per-run 50 --batch 50 --concurrency 8)
  else args=(--traces 2000 --spans-per-trace 10 --batch 500 --concurrency 8 --seed 1); fi
fi
out=bench/out; mkdir -p "$out"; stamp=$out/$mode-$bench-$(date +%Y%m%dT%H%M%S)
export PORT=${PORT:-8019} DATA_DIR=$(mktemp -d) ADMIN_PASSWORD=bench-admin-pw-1 DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 \
       ALLOWED_HOSTS=127.0.0.1,localhost SECURE_SSL_REDIRECT=0 SESSION_COOKIE_SECURE=0
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done; sleep 2;
            for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# Busy CPU seconds of the whole machine, and of PostgreSQL's exited backends (the postmaster's
# children times: a per-process monitor misses backends that come and go).
cpu_seconds() {
  awk '/^cpu /{printf "%.2f ", ($2+$3+$4+$7+$8)/100}' /proc/stat
  if [ "$mode" = pg ]; then awk '{printf "%.2f\n", ($14+$15+$16+$17)/100}' "/proc/$(pgrep -o -x postgres)/stat"
  else echo 0; fi
}
if [ "$mode" = pg ]; then
  db=controlplane_bench
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/15}  # flushed below
  redis-cli -u "$REDIS_URL" flushdb >/dev/null
  make -s migrate
  setsid make -s web > "$stamp-web.log" 2>&1 & pids+=($!); web=$!
  setsid nice -n "${WORKER_NICE:-10}" .venv/bin/celery -A controlplane worker -Q default,ingest -l INFO --concurrency "${WORKER_CONCURRENCY:-2}" \
    > "$stamp-worker.log" 2>&1 & pids+=($!); worker=$!
  setsid make -s beat > "$stamp-beat.log" 2>&1 & pids+=($!)
else
  unset DATABASE_URL REDIS_URL
  setsid make -s run > "$stamp-run.log" 2>&1 & pids+=($!); web=$!; worker=$!
fi
for _ in $(seq 1 120); do curl -sf "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
key=$(.venv/bin/python manage.py create_api_key --project bench --scopes ingest,read --create-project 2>/dev/null | tail -1)
( while kill -0 "$worker" 2>/dev/null; do
    echo "$(date +%s) $(ps -o rss= --ppid "$worker" -p "$worker" | awk '{s+=$1} END {print s}')"
    sleep 10; done > "$stamp-rss.log" ) &
if [ "$bench" = rest ]; then
  .venv/bin/python bench/rest_ingest.py --url "http://127.0.0.1:$PORT" --key "$key" --json-out "$stamp.json" "${args[@]}"
else
  setsid .venv/bin/python bench/span_counter.py --database "${DATABASE_URL:-sqlite:///$DATA_DIR/controlplane.sqlite3}" \
    --out "$stamp.count" --interval "${SPAN_COUNT_INTERVAL:-0.2}" & pids+=($!)
  for _ in $(seq 1 50); do [ -s "$stamp.count" ] && break; sleep 0.1; done
  cpu_before=$(cpu_seconds)
  .venv/bin/python "${OTLP_LOAD:-../shared/bench/otlp_load.py}" load --url "http://127.0.0.1:$PORT/v1/traces" \
    --header "Authorization: Bearer $key" --verify-cmd "cat $stamp.count" \
    --monitor-pid "web=$web" --monitor-pid "worker=$worker" --json-out "$stamp.json" "${args[@]}"
  cleanup; trap - EXIT
  read -r busy pg <<< "$(cpu_seconds)"; read -r busy0 pg0 <<< "$cpu_before"
  echo "CPU seconds from the first request until the system stopped: machine $(echo "$busy - $busy0" | bc)," \
       "PostgreSQL $(echo "$pg - $pg0" | bc) (its backends are counted as they exit)" | tee "$stamp-cpu.txt"
fi
