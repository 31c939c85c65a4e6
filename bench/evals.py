"""Batch evals over a big run log: runs scored per second by an eval job's batch (bench/evals.sh).

Seeds ``--runs`` finished runs through the run log's own door (``traces.services.batch_accept``, then the
projection), each with a model call and a tool call, some failed, some silently so (a failed tool call
nothing retried), some with JSON output or a reference answer; then starts one batch per evaluator set
and waits for a real Celery worker (started by bench/evals.sh) to walk it, chunk by chunk. The figure
is evaluated runs / (finish - start) of the batch, from the batch's own timestamps.

    python -m bench.evals --runs 100000 --sets all,all --json-out bench/out/evals.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import timedelta

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from apps.evals import jobs  # noqa: E402
from apps.evals.models import EvalJobRun, EvalScore  # noqa: E402
from apps.projects import services as projects  # noqa: E402
from apps.projects.models import Project  # noqa: E402
from apps.traces import records  # noqa: E402
from apps.traces import services as traces  # noqa: E402
from apps.traces.models import Run  # noqa: E402

DETERMINISTIC = [
    {"name": "run_succeeded"}, {"name": "silent_success"}, {"name": "latency_slo", "config": {"max_ms": 1500}},
    {"name": "cost_slo", "config": {"max_usd": 0.01}}, {"name": "tool_error_rate"}, {"name": "json_valid"},
    {"name": "contains", "config": {"text": "order"}}, {"name": "regex", "config": {"pattern": r"#\d{4,}"}},
    {"name": "expected_output"},
]
SETS = {"all": DETERMINISTIC,
        "typical": [{"name": "run_succeeded"}, {"name": "silent_success"}, {"name": "json_valid"}]}


def _iso(t) -> str:
    return t.isoformat()


def run_records(i: int, t0) -> list[dict]:
    """A run's records as an agent's SDK sends them: start, a model call, a tool call, the finish."""
    run_id = f"bench-{i:07d}"
    start = t0 + timedelta(milliseconds=37 * i)
    received = _iso(start)
    failed = i % 10 == 9
    tool_failed = i % 7 == 3  # nothing retries it: a silent failure when the run "completes"
    text = (json.dumps({"order": f"#{10000 + i}", "status": "shipped"}) if i % 5 == 0
            else f"Your order #{10000 + i} has shipped." if i % 2 == 0 else "I could not find it.")
    spans = [
        {"span_id": f"{run_id}-llm", "kind": "llm", "name": "chat", "model": "gpt-4o-mini", "provider": "openai",
         "start_time": _iso(start + timedelta(milliseconds=10)), "end_time": _iso(start + timedelta(milliseconds=600)),
         "status": "ok", "usage": {"input_tokens": 400 + i % 300, "output_tokens": 60 + i % 90},
         "output_messages": [{"role": "assistant", "content": text, "finish_reason": "stop"}]},
        {"span_id": f"{run_id}-tool", "kind": "tool", "name": "lookup_order", "tool": {"name": "lookup_order"},
         "start_time": _iso(start + timedelta(milliseconds=620)),
         "end_time": _iso(start + timedelta(milliseconds=700 + (i % 11) * 150)),
         "status": "error" if tool_failed else "ok", **({"status_message": "timeout"} if tool_failed else {})},
    ]
    metadata = {"expected_output": text if i % 3 else "something else"} if i % 4 == 0 else {}
    out = [records.run_start_record({"run_id": run_id, "started_at": received, "agent": {
        "name": ("support-bot", "planner", "triage")[i % 3], "version": str(1 + i % 2)}, "metadata": metadata},
        received_at=received)]
    out += [records.span_record(run_id, s, received_at=received) for s in spans]
    finish = {"ended_at": _iso(start + timedelta(milliseconds=800 + (i % 13) * 100)),
              "status": "failed" if failed else "completed", "output": text}
    out.append(records.run_finish_record(run_id, finish, received_at=received))
    return out


def seed(project: Project, key, n: int, per_batch: int = 250) -> float:
    """``n`` runs through the inbox and the projection; seconds it took."""
    t0 = timezone.now() - timedelta(hours=12)
    began = time.monotonic()
    for first in range(0, n, per_batch):
        recs = [r for i in range(first, min(first + per_batch, n)) for r in run_records(i, t0)]
        body = json.dumps(recs, sort_keys=True).encode()
        traces.batch_accept(project=project, api_key=key, source="rest", records=recs,
                            response={"accepted": len(recs)}, item_count=len(recs), idempotency_key=None,
                            request_hash=hashlib.sha256(body).hexdigest())
        while traces.inbox_step():
            pass
        if first and first % 10_000 == 0:
            print(f"  seeded {first} runs ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
    return time.monotonic() - began


def measure(project: Project, name: str, evaluators: list[dict], timeout: float) -> dict:
    job = jobs.job_create(project=project, actor=None, name=f"bench-{name}-{int(time.time())}",
                          evaluators=evaluators, window_hours=24 * 7)
    batch = jobs.job_start(job=job, trigger=EvalJobRun.Trigger.SCHEDULE)
    deadline = time.monotonic() + timeout
    while (batch := EvalJobRun.objects.get(pk=batch.pk)).state == EvalJobRun.State.RUNNING:
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch.pk} still running after {timeout} s: {batch.scanned}/{batch.total}")
        time.sleep(0.5)
    seconds = (batch.finished_at - batch.created_at).total_seconds()
    return {"set": name, "evaluators": len(evaluators), "state": batch.state, "runs": batch.evaluated,
            "scores_added": batch.scores_added, "errors": batch.errors, "chunks": batch.chunks,
            "seconds": round(seconds, 2), "runs_per_second": round(batch.evaluated / seconds, 1),
            "scores_per_second": round(batch.scores_added / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--sets", default="all,all", help=f"evaluator sets, of: {', '.join(SETS)}; a set named "
                                                         "again is a rerun (every score held: nothing added)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json-out", default="")
    parser.add_argument("--clear-scores", action="store_true", help="delete the project's scores first")
    args = parser.parse_args()

    project = Project.objects.filter(slug="bench").first() or projects.project_create(slug="bench", name="Bench")
    key = projects.api_key_create(project=project, name=f"bench-{int(time.time())}", scopes=["ingest", "read"],
                                  actor=None)[0]
    have = Run.objects.filter(project=project).count()
    seeded = seed(project, key, args.runs - have) if have < args.runs else 0.0
    if connection.vendor == "postgresql":
        # Fresh statistics, as autovacuum gives a table soon after a big load: with none, the planner takes
        # the run chunk's time index over its id range and each chunk reads the whole window.
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    if args.clear_scores:  # measure inserting every score, not skipping those an earlier run stored
        EvalScore.objects.filter(project=project)._raw_delete(EvalScore.objects.db)
    print(f"{args.runs} runs in the log (seeded in {seeded:.0f} s)", file=sys.stderr, flush=True)
    results, done = [], set()
    for name in args.sets.split(","):
        r = measure(project, name, SETS[name], args.timeout)
        r["rerun"] = name in done
        done.add(name)
        r |= {"chunk": settings.EVALS_JOB_CHUNK, "database": connection.vendor, "seed_seconds": round(seeded, 1),
              "at": timezone.now().isoformat(timespec="seconds"), "scores_in_table": EvalScore.objects.count()}
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json_out:
        with open(args.json_out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
