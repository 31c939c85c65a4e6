"""Building writes the way the REST API does (records.py), and draining the inbox as a worker would."""
from __future__ import annotations

import hashlib
import json

from apps.traces import records, services


def accept(project, key, recs: list[dict], *, idempotency_key: str | None = None, response: dict | None = None):
    body = json.dumps(recs, sort_keys=True).encode()
    return services.batch_accept(project=project, api_key=key, source="rest", records=recs,
                                 response=response or {"accepted": len(recs)}, item_count=len(recs),
                                 idempotency_key=idempotency_key, request_hash=hashlib.sha256(body).hexdigest())


def drain() -> int:
    """Project everything claimable; then no batch may be left waiting (a retry would hide a failure)."""
    from apps.traces.models import IngestBatch

    total = 0
    while n := services.inbox_step():
        total += n
    waiting = list(IngestBatch.objects.filter(status__in=["pending", "processing"]).values("pk", "status", "error"))
    assert not waiting, waiting
    return total


T0 = "2026-11-24T10:00:00+00:00"


def at(seconds: float) -> str:
    from datetime import datetime, timedelta
    return (datetime.fromisoformat(T0) + timedelta(seconds=seconds)).isoformat()


def start(run_id: str, **kw) -> dict:
    return records.run_start_record({"run_id": run_id, "started_at": at(0), **kw}, received_at=at(0))


def span(run_id: str, **kw) -> dict:
    return records.span_record(run_id, kw, received_at=at(0))


def update(run_id: str, span_id: str, **kw) -> dict:
    return records.span_update_record(run_id, span_id, kw, received_at=at(30))


def finish(run_id: str, **kw) -> dict:
    return records.run_finish_record(run_id, {"ended_at": at(60), **kw}, received_at=at(60))
