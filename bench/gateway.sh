#!/usr/bin/env bash
# The call boundary's benchmarks (bench/gateway.py) against the production layout on PostgreSQL + Redis:
# one web process (Daphne, `make web`), a Celery worker projecting the gateway's traces, and a fake
# OpenAI upstream (tests/gateway/fake_openai.py, its own process) behind the gateway.
#   bench/gateway.sh reserve  [--concurrency 64 --requests 4000]
#   bench/gateway.sh overhead [--requests 2000]
#   bench/gateway.sh rps      [--concurrency 16 --seconds 20]
#   bench/gateway.sh burst    [--clients 64 --calls 20 [--stream]]
# Results are appended to bench/out/gateway.jsonl; server logs go to bench/out/gateway-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${1:?reserve, overhead, rps or burst}; shift
out=bench/out; mkdir -p "$out"; stamp=$out/gateway-$bench-$(date +%Y%m%dT%H%M%S)
export PORT=${PORT:-8021} DATA_DIR=$(mktemp -d) DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 \
       ALLOWED_HOSTS=127.0.0.1,localhost SECURE_SSL_REDIRECT=0 SESSION_COOKIE_SECURE=0
upstream_port=${UPSTREAM_PORT:-8022}
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done; sleep 2;
            for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
db=controlplane_bench_gateway
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/14}
redis-cli -u "$REDIS_URL" flushdb >/dev/null
make -s migrate
delay=0; [ "$bench" = burst ] && delay=0.3  # the burst: every call is admitted or refused before any settles
setsid .venv/bin/python tests/gateway/fake_openai.py --port "$upstream_port" --models gpt-4o \
  --first-token-delay "$delay" > "$stamp-upstream.log" 2>&1 & pids+=($!)
setsid make -s web > "$stamp-web.log" 2>&1 & pids+=($!)
setsid nice -n "${WORKER_NICE:-10}" .venv/bin/celery -A controlplane worker -Q default,ingest -l WARNING \
  --concurrency "${WORKER_CONCURRENCY:-1}" > "$stamp-worker.log" 2>&1 & pids+=($!)
for _ in $(seq 1 120); do curl -sf "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
key=$(.venv/bin/python manage.py create_api_key --project bench --scopes budget,ingest,read --create-project 2>/dev/null | tail -1)
calls=20; args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[$i]}" = --calls ] && calls=${args[$((i + 1))]}; done
BENCH=$bench CALLS=$calls UPSTREAM="http://127.0.0.1:$upstream_port/v1" .venv/bin/python manage.py shell -c '
import json, os
from apps.budgets import services as budgets
from apps.gateway import services
from apps.projects.models import Project
p = Project.objects.get(slug="bench")
services.upstream_create(project=p, actor=None, name="local", base_url=os.environ["UPSTREAM"], provider="openai",
                         model_names=["gpt-4o"])
if os.environ["BENCH"] == "burst":  # a cap that holds exactly CALLS calls (the gateway holds each call the same)
    bound = len(json.dumps([{"role": "user", "content": "Say five words."}], ensure_ascii=False).encode())
    per_call = bound * 2500 + 16 * 10000  # gpt-4o: $2.50 in, $10 out per million tokens; max_tokens 16
    budgets.budget_create(project=p, actor=None, name="burst", cap_nanos=int(os.environ["CALLS"]) * per_call)
else:  # budgets that apply to every call and never refuse: the ledger path is exercised, not the refusal
    budgets.budget_create(project=p, actor=None, name="project", cap_nanos=10**15)
    budgets.budget_create(project=p, actor=None, name="soft", hard=False, cap_nanos=10**12)
'
.venv/bin/python bench/gateway.py "$bench" --url "http://127.0.0.1:$PORT" --key "$key" \
  --upstream "http://127.0.0.1:$upstream_port" --json-out "$out/gateway.jsonl" "$@"
