"""A real Celery worker killed with SIGKILL in the middle of projecting loses nothing and duplicates
nothing: its lease (15 s by default, renewed while it worked) expires, the new worker that starts
takes the batches over as it does, and every acknowledged span is present exactly once, readable
within 30 s of the new worker starting (with the default lease and no beat to help)."""
from __future__ import annotations

import os
import signal

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Sum

from apps.traces.models import IngestBatch, Run, Span

from .helpers import accept, at, span, start
from .workers import purge_queue, start_worker, stop_worker, wait_for

BATCHES, SPANS_PER_BATCH = 4, 2500

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not (os.environ.get("DATABASE_URL", "").startswith("postgres") and settings.REDIS_URL),
                       reason="needs PostgreSQL and Redis (a separate worker process)"),
]


def _projection_in_flight() -> bool:
    """True while another session holds a write lock on the span table: it is inserting spans in an
    open (not yet committed) projection transaction."""
    with connection.cursor() as cursor:
        cursor.execute("""SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                          WHERE c.relname = 'traces_span' AND l.mode = 'RowExclusiveLock'
                          AND l.pid <> pg_backend_pid()""")
        return cursor.fetchone()[0] > 0


def test_sigkill_mid_projection_then_a_new_worker_leaves_every_span_exactly_once(project, make_key, tmp_path):
    key = make_key(project)[0]
    purge_queue()
    defaults = {"TRACES_LEASE_SECONDS": "15", "TRACES_SWEEP_SECONDS": "15"}
    first = start_worker(tmp_path, "doomed", beat=False, env=defaults)
    try:
        # Wait until the worker consumes (a ping through the broker would do; simplest: give it a batch).
        for b in range(BATCHES):
            recs = [start(f"run-{b}", agent={"name": "crash-test"})] + [
                span(f"run-{b}", span_id=f"s{i}", kind="llm", model="m", start_time=at(i % 50),
                     usage={"input_tokens": 3, "output_tokens": 2}) for i in range(SPANS_PER_BATCH)]
            accept(project, key, recs)  # acknowledged: committed in the inbox, 202 would go out now
        wait_for(_projection_in_flight, 120, "the worker to start inserting spans", tmp_path)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    # Killed mid-transaction: nothing of it is visible, and the batches are held by a dead lease.
    assert Span.objects.count() == 0
    assert IngestBatch.objects.filter(status="processing").exists()

    second = start_worker(tmp_path, "rescuer", beat=False, env=defaults)
    try:
        wait_for(lambda: IngestBatch.objects.filter(status="done").count() == BATCHES, 30,
                 "the new worker to take over and project every batch within 30 s", tmp_path)
    finally:
        stop_worker(second)

    assert Span.objects.count() == BATCHES * SPANS_PER_BATCH
    assert Span.objects.values("trace_id", "span_id").distinct().count() == BATCHES * SPANS_PER_BATCH
    totals = Run.objects.aggregate(spans=Sum("span_count"), tin=Sum("input_tokens"), tout=Sum("output_tokens"))
    assert totals == {"spans": BATCHES * SPANS_PER_BATCH, "tin": 3 * BATCHES * SPANS_PER_BATCH,
                      "tout": 2 * BATCHES * SPANS_PER_BATCH}
    assert not IngestBatch.objects.exclude(status="done").exists()
    assert any(b.attempts >= 2 for b in IngestBatch.objects.all())  # taken over after the kill
