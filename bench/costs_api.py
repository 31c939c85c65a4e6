#!/usr/bin/env python3
"""Server time of ``GET /api/v1/costs`` over the rollups of a big run log (the costs issue's target:
by day and agent over 90 days and 1,000,000 runs, under 200 ms).

Seeds PostgreSQL directly with the rollup rows that --runs runs of three model calls each spread over
--days days produce (20 agents in 3 versions, 5,000 end users, 4 keys, 9 models of 4 providers):
``CostDay`` (no end user), ``CostDayUser`` (with) and ``CostDayEndUser`` (end users alone), exactly as the projection would have summed
them, then asks the API through Django's test client in this process (authentication, view,
selector, serializer; no network) --repeat times per query, with an API key, and prints the median
and 95th percentile server time, the query count and the rows returned.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/cp_bench_costs python bench/costs_api.py --seed
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/cp_bench_costs python bench/costs_api.py  # measure only

``--seed`` drops and recreates the database first (it must not be one you care about).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,127.0.0.1")
os.environ.setdefault("DATA_DIR", "/tmp/cp-bench-costs")

MODELS = [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("gpt-4.1", "openai"), ("o4-mini", "openai"),
          ("claude-sonnet-4-5", "anthropic"), ("claude-haiku-4-5", "anthropic"), ("gemini-2.5-pro", "google"),
          ("gemini-2.5-flash", "google"), ("amazon.nova-pro-v1:0", "aws")]


def _recreate(url: str) -> None:
    import psycopg

    base, name = url.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, check=True)


def _seed(args) -> str:
    from django.db import connection

    from apps.projects import services

    project = services.project_create(slug="bench", name="Bench", actor=None)
    keys = [services.api_key_create(project=project, name=f"k{i}", scopes=["ingest", "read"], actor=None)
            for i in range(4)]
    key_ids = [k.pk for k, _ in keys]
    models = ", ".join(f"('{m}', '{p}', {i})" for i, (m, p) in enumerate(MODELS))
    started = time.monotonic()
    # One row per (run, call): run g, call c (0..2); the model by (g + c) % 9; a call costs 0.1 to
    # 10 cents; the day walks back over --days days as g grows.
    calls = f"""
        SELECT (current_date - ((%(days)s - 1) * (1 - g::float / %(n)s))::int) AS day,
               'agent-' || (g %% 20) AS agent, 'v' || (g %% 3) AS version, 'user-' || (g %% 5000) AS end_user,
               (ARRAY{key_ids})[1 + g %% 4] AS key_id, m.model, m.provider,
               100000 + ((g * 7 + c * 13) %% 1000) * 100000 AS cost, 1200 AS tin, 150 AS tout, 800 AS tread
        FROM generate_series(1, %(n)s) AS g
        CROSS JOIN generate_series(0, 2) AS c
        JOIN (VALUES {models}) AS m(model, provider, i) ON m.i = (g + c) %% {len(MODELS)}"""
    measures = ("SUM(cost), COUNT(*), 0, SUM(tin), SUM(tout), SUM(tread), 0, 0")
    cols = ("cost_nanos, calls, unpriced_calls, input_tokens, output_tokens, cache_read_tokens, "
            "cache_write_tokens, reasoning_tokens")
    with connection.cursor() as c:
        c.execute("SET synchronous_commit = off")
        c.execute(f"""INSERT INTO budgets_costday (project_id, day, agent_name, agent_version, api_key_id, model,
                          provider, {cols})
                      SELECT %(p)s, day, agent, version, key_id, model, provider, {measures}
                      FROM ({calls}) x GROUP BY day, agent, version, key_id, model, provider""",
                  {"p": project.pk, "n": args.runs, "days": args.days})
        c.execute(f"""INSERT INTO budgets_costdayuser (project_id, day, end_user, agent_name, agent_version,
                          api_key_id, model, provider, {cols})
                      SELECT %(p)s, day, end_user, agent, version, key_id, model, provider, {measures}
                      FROM ({calls}) x GROUP BY day, end_user, agent, version, key_id, model, provider""",
                  {"p": project.pk, "n": args.runs, "days": args.days})
        c.execute(f"""INSERT INTO budgets_costdayenduser (project_id, day, end_user, {cols})
                      SELECT %(p)s, day, end_user, {measures}
                      FROM ({calls}) x GROUP BY day, end_user""",
                  {"p": project.pk, "n": args.runs, "days": args.days})
        c.execute("ANALYZE")
        c.execute("SELECT (SELECT count(*) FROM budgets_costday), (SELECT count(*) FROM budgets_costdayuser)")
        day_rows, user_rows = c.fetchone()
    print(f"seeded in {time.monotonic() - started:.0f} s: {day_rows:,} CostDay rows, {user_rows:,} CostDayUser rows",
          flush=True)
    Path(os.environ["DATA_DIR"]).mkdir(parents=True, exist_ok=True)
    (Path(os.environ["DATA_DIR"]) / "bench-key").write_text(keys[0][1])
    return keys[0][1]


def _measure(args, raw: str) -> dict:
    from datetime import date, timedelta

    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    until = date.today()
    since = (until - timedelta(days=args.days - 1)).isoformat()
    span = f"since={since}&until={until.isoformat()}"
    queries = {
        f"by day and agent, {args.days} days": f"/api/v1/costs?group_by=day,agent&{span}",
        f"by day, {args.days} days": f"/api/v1/costs?group_by=day&{span}",
        f"by agent, version and model, {args.days} days": f"/api/v1/costs?group_by=agent,version,model&{span}",
        f"by day and model, one agent, {args.days} days": f"/api/v1/costs?group_by=day,model&agent=agent-7&{span}",
        f"by end user, {args.days} days": f"/api/v1/costs?group_by=end_user&{span}",
        f"by end user and model, {args.days} days": f"/api/v1/costs?group_by=end_user,model&{span}",
        "by day and agent, 7 days": f"/api/v1/costs?group_by=day,agent&since={until - timedelta(days=6)}",
        "one end user by day and model, 90 days": f"/api/v1/costs?group_by=day,model&end_user=user-42&{span}",
    }
    out = {}
    for name, url in queries.items():
        times, n_queries, rows = [], 0, 0
        for _ in range(args.repeat):
            with CaptureQueriesContext(connection) as ctx:
                t0 = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, (url, response.status_code, response.content[:300])
            n_queries, rows = len(ctx.captured_queries), len(response.json()["rows"])
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        out[name] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(p95, 1), "queries": n_queries,
                     "rows": rows}
        print(f"{name:48s} p50 {out[name]['p50_ms']:7.1f} ms  p95 {p95:7.1f} ms  {n_queries:2d} queries  "
              f"{rows:6d} rows", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", action="store_true", help="drop, recreate, migrate and seed the database first")
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        sys.exit("DATABASE_URL must name a PostgreSQL database (it is dropped and recreated with --seed)")
    if args.seed:
        _recreate(url)
    import django

    django.setup()
    raw = _seed(args) if args.seed else (Path(os.environ["DATA_DIR"]) / "bench-key").read_text()
    figures = _measure(args, raw)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
