#!/usr/bin/env bash
# From an approver's click to the agent's long-poll answer (bench/approvals.py), on the production layout:
# PostgreSQL + Redis (the channel layer), one web process (Daphne, `make web`).
#   bench/approvals.sh [--agents 100 --approvers 4 --rounds 3]
# Results are appended to bench/out/approvals.jsonl; the server's log goes to bench/out/approvals-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/out; mkdir -p "$out"; stamp=$out/approvals-$(date +%Y%m%dT%H%M%S)
export PORT=${PORT:-8023} DATA_DIR=$(mktemp -d) DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 \
       ALLOWED_HOSTS=127.0.0.1,localhost SECURE_SSL_REDIRECT=0 SESSION_COOKIE_SECURE=0 CSRF_COOKIE_SECURE=0
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT -- "-$p" 2>/dev/null || true; done; sleep 2;
            for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
db=controlplane_bench_approvals
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/13}
redis-cli -u "$REDIS_URL" flushdb >/dev/null
make -s migrate
setsid make -s web > "$stamp-web.log" 2>&1 & pids+=($!)
for _ in $(seq 1 120); do curl -sf "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
key=$(.venv/bin/python manage.py create_api_key --project bench --scopes approvals,read --create-project 2>/dev/null | tail -1)
sessions=$(.venv/bin/python manage.py shell -c '
import json
from django.contrib.auth import get_user_model
from django.test import Client
from apps.projects import services
from apps.projects.models import Project
p = Project.objects.get(slug="bench")
out = []
for i in range(8):
    user = get_user_model().objects.create_user(f"approver{i}", password=None)
    services.role_grant(project=p, user=user, role="approver", actor=None)
    c = Client()
    c.force_login(user)
    out.append(c.cookies["sessionid"].value)
print(json.dumps(out))
' | tail -1)
.venv/bin/python -m bench.approvals --url "http://127.0.0.1:$PORT" --key "$key" --sessions "$sessions" \
  --json-out "$out/approvals.jsonl" "$@"
