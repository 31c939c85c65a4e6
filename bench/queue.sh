#!/usr/bin/env bash
# The GPU queue's dispatcher (bench/queue.py), on the production layout: PostgreSQL + Redis, one web process
# (Daphne, `make web`: the agents' sockets), the default worker (`make worker`: the dispatcher's wake-ups)
# and the GPU worker (`make gpu-worker`: the declared GPU's queue, GPU_WORKER_CONCURRENCY processes).
#   bench/queue.sh [--overhead 200 --burst 2000 --sockets 100]
# Results are appended to bench/out/queue.jsonl; the processes' logs go to bench/out/queue-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/out; mkdir -p "$out"; stamp=$out/queue-$(date +%Y%m%dT%H%M%S)
export PORT=${PORT:-8024} DATA_DIR=$(mktemp -d) DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 \
       ALLOWED_HOSTS=127.0.0.1,localhost SECURE_SSL_REDIRECT=0 SESSION_COOKIE_SECURE=0 CSRF_COOKIE_SECURE=0 \
       SCHEDULER_GPUS=declared SCHEDULER_DECLARED_GPUS=bench0:1000000 GPU_WORKER_CONCURRENCY=${GPU_WORKER_CONCURRENCY:-4}
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done; sleep 2;
            for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
db=controlplane_bench_queue
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/12}
redis-cli -u "$REDIS_URL" flushdb >/dev/null
make -s migrate
setsid make -s web > "$stamp-web.log" 2>&1 & pids+=($!)
setsid make -s worker > "$stamp-worker.log" 2>&1 & pids+=($!)
setsid make -s gpu-worker > "$stamp-gpu-worker.log" 2>&1 & pids+=($!)
for _ in $(seq 1 120); do curl -sf "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
.venv/bin/python -m bench.queue --url "http://127.0.0.1:$PORT" --json-out "$out/queue.jsonl" "$@"
