"""A task's life on its run's trace: each attempt a ``queue.attempt`` span (which backend and device ran
it, and how it ended: succeeded, failed, cancelled, redirected, retried), and the whole task a
``queue.task`` span (queued to finished, with how long it waited and ran). Recorded through the run log's
inbox like any producer's records, in the caller's transaction; nothing when the task names no run."""
from __future__ import annotations

from datetime import datetime

from apps.traces import records
from apps.traces import services as traces


def _ms(a: datetime | None, b: datetime | None) -> int | None:
    return None if a is None or b is None else max(0, int((b - a).total_seconds() * 1000))


def _span(task, name: str, start: datetime, end: datetime, status: str, attributes: dict, message: str = "") -> dict:
    span = {"span_id": records.new_id(), "name": name, "kind": "step", "start_time": start.isoformat(),
            "end_time": end.isoformat(), "status": status, "component": "scheduler", "model": task.model,
            "attributes": {"controlplane.queue.task_id": task.public_id, "controlplane.queue.kind": task.kind,
                           "controlplane.queue.memory_mb": task.memory_mb, **attributes}}
    if task.span_id:
        span["parent_span_id"] = task.span_id
    if message:
        span["status_message"] = message[:500]
    return {"op": "span", "run_id": task.run_id, "span": span}


def _record(task, recs: list[dict]) -> None:
    if not task.run_id:
        return
    for i, rec in enumerate(recs):
        records.validate_record(rec, f"records[{i}]")
    traces.batch_accept(project=task.project, api_key=task.api_key, source="scheduler", response={}, records=recs,
                        item_count=len(recs))


def attempt(task, *, backend_name: str, device_name: str, started_at: datetime, now: datetime, outcome: str,
            message: str = "") -> None:
    """One attempt ended (``outcome``: succeeded, failed, cancelled, redirected, retried)."""
    _record(task, [_span(task, "queue.attempt", started_at, now, "ok" if outcome == "succeeded" else "error", {
        "controlplane.queue.backend": backend_name, "controlplane.queue.device": device_name,
        "controlplane.queue.attempt": task.attempts, "controlplane.queue.generation": task.generation,
        "controlplane.queue.outcome": outcome}, message)])


def finished(task, *, now: datetime) -> None:
    """The task ended (succeeded, failed, cancelled)."""
    _record(task, [_span(task, "queue.task", task.created_at, task.finished_at or now,
                         "ok" if task.state == "succeeded" else "error", {
        "controlplane.queue.state": task.state, "controlplane.queue.backend": task.backend.name,
        "controlplane.queue.device": task.device.name, "controlplane.queue.attempts": task.attempts,
        "controlplane.queue.redirects": task.redirects, "controlplane.queue.priority": task.priority,
        "controlplane.queue.waited_ms": _ms(task.queued_at, task.started_at or task.finished_at),
        "controlplane.queue.ran_ms": _ms(task.started_at, task.finished_at),
        "controlplane.queue.requested_by": task.requested_by}, task.error_code)])
