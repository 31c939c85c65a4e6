#!/usr/bin/env bash
# The reservation ledger alone (bench/ledger.py) on a fresh PostgreSQL database: --threads threads
# reserving against the same two ledger rows, each thread its own connection (no pool). Results are appended to bench/out/ledger.jsonl.
#   bench/ledger.sh [--threads 64 --reservations 20000]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
db=controlplane_bench_ledger
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/14} \
       DATABASE_POOL=0 DATA_DIR=$(mktemp -d) DEBUG=0 SECRET_KEY=bench-secret-key-not-for-production-000000000000 ALLOWED_HOSTS=localhost
exec .venv/bin/python bench/ledger.py --json-out bench/out/ledger.jsonl "$@"
