#!/usr/bin/env python3
"""Server time and query count of the product's pages on a big run log (the audit UI's targets).

Seeds PostgreSQL directly (bypassing ingest: ``INSERT ... SELECT generate_series``) with --runs runs of
--spans-per-run spans each over --days days, plus one run of --big-run-spans spans, then asks each
page through Django's test client in this process (middleware, view, selectors, templates; no network)
--repeat times, and prints the median and 95th percentile server time and the query count per page.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/cp_bench python bench/dashboard_pages.py --seed
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/cp_bench python bench/dashboard_pages.py   # measure only

``--seed`` drops and recreates the database first (it must not be one you care about).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,127.0.0.1")
os.environ.setdefault("DATA_DIR", "/tmp/cp-bench-pages")

AGENTS = 20
BIG_RUN = "big-run"


def _recreate(url: str) -> None:
    import psycopg

    base, name = url.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, check=True)


def _seed(args) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from apps.projects import services
    from apps.projects.models import Role

    project = services.project_create(slug="bench", name="Bench", actor=None)
    auditor = get_user_model().objects.create_user("auditor", password="pw-auditor-123")
    services.role_grant(project=project, user=auditor, role=Role.AUDITOR, actor=None)
    n, per, days = args.runs, args.spans_per_run, args.days
    started = time.monotonic()
    with connection.cursor() as c:
        c.execute("SET synchronous_commit = off")
        # Runs: newest first by id; statuses 90 % completed, 6 % failed, 2 % running, 2 % lost; 20
        # agents in 3 versions; sessions of 5 turns; a few loops.
        c.execute(f"""
            INSERT INTO traces_run (project_id, run_id, trace_id, agent_name, agent_version, end_user, session_id,
                parent_run_ref, status, start_received, started_at, ended_at, duration_ms, input, output, metadata,
                models_used, providers_used, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                reasoning_tokens, error_code, failing_span_id, span_count, error_span_count, last_span_at,
                derive_status, has_loop, created_at, updated_at)
            SELECT %(p)s, 'run-' || g, md5(g::text), 'agent-' || (g %% {AGENTS}), 'v' || (g %% 3), 'user-' || (g %% 5000),
                'sess-' || (g / 5), '',
                CASE WHEN g %% 50 = 0 THEN 'running' WHEN g %% 50 = 1 THEN 'lost'
                     WHEN g %% 17 = 0 THEN 'failed' ELSE 'completed' END,
                true, t, CASE WHEN g %% 50 = 0 THEN NULL ELSE t + interval '3 seconds' END,
                CASE WHEN g %% 50 = 0 THEN NULL ELSE 3000 END,
                jsonb_build_object('question', 'question number ' || g), NULL,
                jsonb_build_object('tier', CASE WHEN g %% 4 = 0 THEN 'pro' ELSE 'free' END),
                '["gpt-4o"]'::jsonb, '["openai"]'::jsonb, 1200, 150, 800, 0, 0,
                CASE WHEN g %% 50 = 1 THEN 'run_lost' WHEN g %% 17 = 0 THEN 'tool_timeout' ELSE '' END, '',
                {per}, CASE WHEN g %% 17 = 0 THEN 1 ELSE 0 END, t, false, g %% 97 = 0, t, t
            FROM generate_series(1, %(n)s) AS g,
                 LATERAL (SELECT now() - (%(days)s * interval '1 day') * (1 - g::float / %(n)s)) AS s(t)
        """, {"p": project.pk, "n": n, "days": days})
        print(f"runs: {time.monotonic() - started:.0f} s", flush=True)
        # Spans: per run a root agent span, model calls and tool calls under it.
        c.execute(f"""
            INSERT INTO traces_span (project_id, run_id, trace_id, span_id, parent_span_id, name, kind, start_time,
                end_time, status, status_message, error_code, retry_of, fallback_of, component, action, provider,
                request_model, response_model, endpoint, input_tokens, output_tokens, attributes, events, received_at)
            SELECT r.project_id, r.id, r.trace_id, 's' || k, CASE WHEN k = 0 THEN '' ELSE 's0' END,
                CASE WHEN k = 0 THEN 'agent' WHEN k %% 2 = 1 THEN 'chat gpt-4o' ELSE 'search' END,
                CASE WHEN k = 0 THEN 'agent' WHEN k %% 2 = 1 THEN 'llm' ELSE 'tool' END,
                r.started_at + k * interval '100 ms', r.started_at + (k + 1) * interval '100 ms',
                'ok', '', '', '', '', '', '', CASE WHEN k %% 2 = 1 THEN 'openai' ELSE '' END,
                CASE WHEN k %% 2 = 1 THEN 'gpt-4o' ELSE '' END, '', '',
                CASE WHEN k %% 2 = 1 THEN 240 END, CASE WHEN k %% 2 = 1 THEN 30 END, '{{}}'::jsonb, '[]'::jsonb,
                r.started_at
            FROM traces_run r, generate_series(0, {per - 1}) AS k
            WHERE r.project_id = %(p)s
        """, {"p": project.pk})
        print(f"spans: {time.monotonic() - started:.0f} s", flush=True)
        # One run of many spans: a chain of agent steps, each with a model call and a tool call.
        c.execute(f"""
            INSERT INTO traces_run (project_id, run_id, trace_id, agent_name, agent_version, end_user, session_id,
                parent_run_ref, status, start_received, started_at, ended_at, duration_ms, metadata, models_used,
                providers_used, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens,
                error_code, failing_span_id, span_count, error_span_count, last_span_at, derive_status, has_loop,
                created_at, updated_at)
            VALUES (%(p)s, '{BIG_RUN}', md5('{BIG_RUN}'), 'agent-big', 'v1', 'user-big', '', '', 'completed', true,
                now() - interval '1 hour', now() - interval '30 minutes', 1800000, '{{}}', '["gpt-4o"]',
                '["openai"]', 0, 0, 0, 0, 0, '', '', {args.big_run_spans}, 0, now(), false, false, now(), now())
        """, {"p": project.pk})
        c.execute(f"""
            INSERT INTO traces_span (project_id, run_id, trace_id, span_id, parent_span_id, name, kind, start_time,
                end_time, status, status_message, error_code, retry_of, fallback_of, component, action, provider,
                request_model, response_model, endpoint, input_tokens, output_tokens, tool, attributes, events,
                received_at, input_messages)
            SELECT r.project_id, r.id, r.trace_id, 'b' || k,
                CASE WHEN k = 0 THEN '' WHEN k %% 3 = 0 THEN 'b' || (k - 3) ELSE 'b' || (k - k %% 3) END,
                CASE WHEN k %% 3 = 0 THEN 'step ' || k WHEN k %% 3 = 1 THEN 'chat gpt-4o' ELSE 'search' END,
                CASE WHEN k %% 3 = 0 THEN 'agent' WHEN k %% 3 = 1 THEN 'llm' ELSE 'tool' END,
                r.started_at + k * interval '300 ms', r.started_at + k * interval '300 ms' + interval '250 ms',
                'ok', '', '', '', '', '', '', '', CASE WHEN k %% 3 = 1 THEN 'gpt-4o' ELSE '' END, '', '', NULL, NULL,
                CASE WHEN k %% 3 = 2 THEN jsonb_build_object('name', 'search', 'arguments',
                    jsonb_build_object('q', repeat('x', 2000))) END,
                '{{}}'::jsonb, '[]'::jsonb, now(),
                CASE WHEN k %% 3 = 1 THEN jsonb_build_array(jsonb_build_object('role', 'user', 'content',
                    repeat('y', 20000))) END
            FROM traces_run r, generate_series(0, {args.big_run_spans - 1}) AS k
            WHERE r.project_id = %(p)s AND r.run_id = '{BIG_RUN}'
        """, {"p": project.pk})
        c.execute("ANALYZE")
    print(f"seeded in {time.monotonic() - started:.0f} s", flush=True)


def _measure(args) -> dict:
    from django.db import connection, reset_queries
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    client.login(username="auditor", password="pw-auditor-123")
    first = client.get("/runs/").content.decode()
    cursor = re.search(r'href="\?after=([^"&]+)" rel="next"', first).group(1)
    pages = {
        "overview": "/",
        "runs": "/runs/",
        "runs, filtered (agent + status)": "/runs/?agent=agent-7&status=failed",
        "runs, filtered (metadata tier=pro, since 7d)": "/runs/?meta=tier%3Dpro&since=7d",
        "runs, filtered (has loop)": "/runs/?has_loop=true",
        "runs, page 2 (cursor)": f"/runs/?after={cursor}",
        f"run page, {args.big_run_spans} spans": f"/runs/bench/{BIG_RUN}/",
        "run page, 10 spans": "/runs/bench/run-12345/",
        "span panel (20 kB input)": f"/runs/bench/{BIG_RUN}/spans/b1/",
        "agents (7 d)": "/agents/",
        "session page": "/sessions/bench/sess-1000/",
    }
    out = {}
    for name, url in pages.items():
        times, queries, size = [], 0, 0
        for _ in range(args.repeat):
            reset_queries()
            with CaptureQueriesContext(connection) as ctx:
                t0 = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, (url, response.status_code)
            queries, size = len(ctx.captured_queries), len(response.content)
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        out[name] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(p95, 1), "queries": queries,
                     "bytes": size}
        print(f"{name:48s} p50 {out[name]['p50_ms']:8.1f} ms  p95 {p95:8.1f} ms  {queries:3d} queries  "
              f"{size / 1024:8.0f} KiB", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", action="store_true", help="drop, recreate, migrate and seed the database first")
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--spans-per-run", type=int, default=10)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--big-run-spans", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        sys.exit("DATABASE_URL must name a PostgreSQL database (it is dropped and recreated with --seed)")
    if args.seed:
        _recreate(url)
    import django

    django.setup()
    if args.seed:
        _seed(args)
    figures = _measure(args)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
