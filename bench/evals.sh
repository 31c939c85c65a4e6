#!/usr/bin/env bash
# Batch evals over a big run log (bench/evals.py), on the production layout: PostgreSQL + Redis + one Celery
# worker (`make worker`, its default prefork pool) walking the batch chunk by chunk.
#   bench/evals.sh [--runs 100000 --sets all,all]   (the second "all": a rerun, every score held)
# The seeded database is kept between runs (BENCH_KEEP_DB=1 reuses it); results are appended to
# bench/out/evals.jsonl, the worker's log goes to bench/out/evals-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/out; mkdir -p "$out"; stamp=$out/evals-$(date +%Y%m%dT%H%M%S)
export DATA_DIR=$(mktemp -d) DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 \
       ALLOWED_HOSTS=127.0.0.1,localhost
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; sleep 2;
            for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
db=controlplane_bench_evals
if [ "${BENCH_KEEP_DB:-0}" != 1 ]; then
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
fi
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/14}
redis-cli -u "$REDIS_URL" flushdb >/dev/null
make -s migrate
setsid make -s worker > "$stamp-worker.log" 2>&1 & pids+=($!)
.venv/bin/python -m bench.evals --json-out "$out/evals.jsonl" "$@"
