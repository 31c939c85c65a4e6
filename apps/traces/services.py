"""Writes to the run log: accept a batch durably, then project it into runs, spans and tool calls.

Accept (``batch_accept``) is the only thing a request waits for: one insert into the inbox, in the
request's transaction, with the ``Idempotency-Key`` check. Projection (``inbox_project``) runs on a
worker: it leases batches, applies them in one transaction per group of batches, and marks them done
in that same transaction, so a worker killed halfway leaves nothing behind but an expiring lease.

Projection is idempotent: a span already stored (same project, trace id and span id) is skipped,
and run totals move by the difference a batch makes to the *effective* spans (span + its updates),
computed under a row lock on each run touched. Re-projecting a batch, or receiving a span twice,
therefore never counts anything twice.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from apps.audit.services import Actor, audit_record
from apps.common import live
from apps.common.bulk import insert_rows, insert_rows_ignoring_conflicts, update_objects
from apps.common.errors import ApiError, ErrorCode
from apps.projects.models import Project

from . import admission, signals
from .models import LOST_ERROR_CODE, TOKEN_FIELDS, DeadRecord, IngestBatch, Run, Span, SpanUpdate, ToolCall
from .records import BIGINT_MAX, USAGE_KEYS, RecordError, parse_time, trace_id_for_run

logger = logging.getLogger(__name__)

# --- settings -------------------------------------------------------------------------------------


def _lease() -> timedelta:
    return timedelta(seconds=settings.TRACES_LEASE_SECONDS)


def _max_attempts() -> int:
    return getattr(settings, "TRACES_MAX_ATTEMPTS", 5)


# --- live groups (the UI issue's consumers subscribe to these) ---------------------------------------


def project_runs_group(project_id: int) -> str:
    return f"traces.project.{project_id}.runs"


def run_group(run_pk: int) -> str:
    return f"traces.run.{run_pk}"


# --- accept ---------------------------------------------------------------------------------------

# Decoders turn a stored payload into canonical records (records.py). "records" payloads are already
# canonical; higher apps (OTLP ingest) register theirs from AppConfig.ready().
Decoder = Callable[[IngestBatch], list[dict]]
DECODERS: dict[str, Decoder] = {"records": lambda batch: batch.payload}


def register_decoder(kind: str, decoder: Decoder) -> None:
    DECODERS[kind] = decoder


def _replay(existing: IngestBatch, request_hash: str) -> dict:
    if existing.request_hash != request_hash:
        raise ApiError(ErrorCode.IDEMPOTENCY_CONFLICT,
                       "This Idempotency-Key was already used with a different request.", status_code=409,
                       details={"batch_id": str(existing.public_id)})
    return {**(existing.response or {}), "batch_id": str(existing.public_id)}


def batch_accept(*, project, api_key, source: str, response: dict, records: list[dict] | None = None,
                 kind: str = "records", raw: bytes | None = None, item_count: int = 0,
                 idempotency_key: str | None = None, request_hash: str = "") -> tuple[dict, bool]:
    """Store one write durably and schedule its projection.

    Returns ``(response, replayed)``; ``response`` is what the client is answered (for a replayed
    ``Idempotency-Key``, the first answer). Raises ApiError 409 when the key was used with another
    body. Database faults propagate (the API answers 503).
    """
    with transaction.atomic():
        if idempotency_key:
            existing = IngestBatch.objects.filter(project=project, idempotency_key=idempotency_key).first()
            if existing is not None:
                return _replay(existing, request_hash), True
        batch = IngestBatch(project=project, api_key=api_key, source=source, kind=kind, payload=records,
                            raw=raw, item_count=item_count, idempotency_key=idempotency_key or None,
                            request_hash=request_hash, response={**response})
        try:
            with transaction.atomic():
                batch.save()
        except IntegrityError:
            if not idempotency_key:
                raise
            existing = IngestBatch.objects.get(project=project, idempotency_key=idempotency_key)
            return _replay(existing, request_hash), True
        transaction.on_commit(lambda: _enqueue(batch.pk), robust=True)
        # Counted now rather than on commit, so that concurrent requests see it as soon as possible; one
        # that rolls back is over-counted until the sweeper's reconcile (it sheds early, never late).
        admission.backlog_add(item_count)
    return {**batch.response, "batch_id": str(batch.public_id)}, False


class _Enqueuer:
    """One long-lived thread per process sends the projection tasks.

    A request never waits on the broker (an unreachable one would cost it the connection timeout),
    and Celery's per-thread result backend is built once rather than in every request thread (that
    was a quarter of the web process's CPU under load). Ids waiting together go out as one task per
    TRACES_PROJECT_BATCH_LIMIT of them: a task leases up to that many batches, its own first. An id lost here (the process
    exits first, the broker is down) costs promptness only: the batch is durable and the sweeper
    projects it.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)  # a child starts with no thread and a free lock

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, batch_id: int) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="traces-enqueuer", daemon=True)
                    self._thread.start()
        self._queue.put(batch_id)

    def _run(self) -> None:
        while True:
            ids = [self._queue.get()]
            try:
                while True:
                    ids.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            # One task per TRACES_PROJECT_BATCH_LIMIT ids waiting; if the broker refuses one, the
            # rest wait for the sweeper rather than each waiting out the connection timeout.
            limit = getattr(settings, "TRACES_PROJECT_BATCH_LIMIT", 20)
            for first in ids[::limit]:
                if not _send_projection(first):
                    break


_enqueuer = _Enqueuer()


def _enqueue(batch_id: int) -> None:
    """Ask a worker to project now (asynchronously; see _Enqueuer)."""
    _enqueuer.put(batch_id)


def _send_projection(batch_id: int) -> bool:
    from .tasks import inbox_project as inbox_project_task

    try:
        inbox_project_task.apply_async(kwargs={"batch_id": batch_id}, retry=False)
    except Exception as exc:  # noqa: BLE001 - the batch is durable; only its promptness suffers
        logger.warning("could not enqueue projection of batch %s (the sweeper will): %r", batch_id, exc)
        return False
    return True


# --- the effective span: a stored span merged with its late updates --------------------------------

_SPAN_SCALARS = ("name", "kind", "start_time", "end_time", "status", "status_message", "error_code", "retry_of",
                 "fallback_of", "component", "action", "details", "provider", "model", "response_model", "endpoint",
                 "time_to_first_token_ms", "input_messages", "output_messages")


def span_to_record(span: Span) -> dict:
    """A stored span back in the canonical record shape (the inverse of ``_span_row``)."""
    rec: dict[str, Any] = {
        "span_id": span.span_id, "parent_span_id": span.parent_span_id, "name": span.name, "kind": span.kind,
        "start_time": span.start_time.isoformat(), "status": span.status,
        "attributes": span.attributes or {}, "events": span.events or [],
    }
    if span.end_time is not None:
        rec["end_time"] = span.end_time.isoformat()
    for key in ("status_message", "error_code", "retry_of", "fallback_of", "component", "action", "provider",
                "response_model", "endpoint"):
        if getattr(span, key):
            rec[key] = getattr(span, key)
    if span.request_model:
        rec["model"] = span.request_model
    for key in ("details", "input_messages", "output_messages", "time_to_first_token_ms", "tool"):
        if getattr(span, key) is not None:
            rec[key] = getattr(span, key)
    usage = {k: getattr(span, k) for k in USAGE_KEYS if getattr(span, k) is not None}
    if usage:
        rec["usage"] = usage
    stream = {k: v for k, v in (("chunks", span.stream_chunks),
                                ("output_tokens_per_second", span.output_tokens_per_second)) if v is not None}
    if stream:
        rec["stream"] = stream
    return rec


def merge_span(base: dict, updates: list[dict]) -> dict:
    """Apply late updates in arrival order: maps merge, events append, everything else replaces."""
    if not updates:
        return base
    out = dict(base)
    for fields in updates:
        for key, value in fields.items():
            if key in ("attributes", "usage", "tool", "stream"):
                out[key] = {**(out.get(key) or {}), **value}
            elif key == "events":
                out["events"] = list(out.get("events") or []) + list(value)
            else:
                out[key] = value
    return out


def _span_row(rec: dict, *, project_id: int, run: Run, trace_id: str, batch_id: int | None) -> dict:
    """A span record as a Span row ({attname: value}) for ``insert_rows``."""
    usage = rec.get("usage") or {}
    stream = rec.get("stream") or {}
    return {
        "project_id": project_id, "run_id": run.pk, "trace_id": trace_id, "span_id": rec["span_id"],
        "parent_span_id": rec.get("parent_span_id", ""), "name": rec["name"], "kind": rec["kind"],
        "start_time": parse_time(rec["start_time"]), "end_time": parse_time(rec.get("end_time")),
        "status": rec.get("status", "unset"), "status_message": rec.get("status_message", ""),
        "error_code": rec.get("error_code", ""), "retry_of": rec.get("retry_of", ""),
        "fallback_of": rec.get("fallback_of", ""), "component": rec.get("component", ""),
        "action": rec.get("action", ""), "details": rec.get("details"), "provider": rec.get("provider", ""),
        "request_model": rec.get("model", ""), "response_model": rec.get("response_model", ""),
        "endpoint": rec.get("endpoint", ""), "time_to_first_token_ms": rec.get("time_to_first_token_ms"),
        "stream_chunks": stream.get("chunks"), "output_tokens_per_second": stream.get("output_tokens_per_second"),
        "input_messages": rec.get("input_messages"), "output_messages": rec.get("output_messages"),
        "tool": rec.get("tool"), "attributes": rec.get("attributes") or {}, "events": rec.get("events") or [],
        "batch_id": batch_id, **{k: usage.get(k) for k in USAGE_KEYS},
    }


def _contribution(eff: dict | None) -> tuple[int, ...]:
    """What one effective span adds to its run: the five token counts, one span, one error or not."""
    if eff is None:
        return (0,) * (len(TOKEN_FIELDS) + 2)
    usage = eff.get("usage") or {}
    return (*(usage.get(k) or 0 for k in USAGE_KEYS), 1, 1 if eff.get("status") == "error" else 0)


def _tool_status(eff: dict) -> str:
    if eff.get("status") == "error" or (eff.get("tool") or {}).get("error"):
        return ToolCall.Status.ERROR
    if eff.get("end_time") or eff.get("status") == "ok":
        return ToolCall.Status.OK
    return ToolCall.Status.RUNNING


def _latency_ms(eff: dict) -> float | None:
    if not eff.get("end_time"):
        return None
    return (parse_time(eff["end_time"]) - parse_time(eff["start_time"])).total_seconds() * 1000


# --- projection -----------------------------------------------------------------------------------


@dataclass
class RunChanges:
    """What one projection changed, for broadcasts and signals after commit."""

    runs: dict[int, Run] = field(default_factory=dict)
    new_spans: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    updated_spans: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    finished: set[int] = field(default_factory=set)


class _PoisonBatch(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _decode(batch: IngestBatch) -> list[dict]:
    decoder = DECODERS.get(batch.kind)
    if decoder is None:
        raise _PoisonBatch("unknown_kind", f"no decoder for batch kind {batch.kind!r}")
    try:
        records = decoder(batch)
    except RecordError as exc:
        raise _PoisonBatch("invalid_record", str(exc)) from exc
    if not isinstance(records, list):
        raise _PoisonBatch("invalid_record", "payload is not a list of records")
    for i, problem in _decode_problems(records):
        raise _PoisonBatch("invalid_record", f"record {i}: {problem}")
    return records


def _decode_problems(records: list) -> list[tuple[int, str]]:
    """What makes records unreadable to the projection at all (their op and run id), by position."""
    problems = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or rec.get("op") not in ("run.start", "span", "span.update", "run.finish"):
            problems.append((i, f"unknown op {rec.get('op') if isinstance(rec, dict) else rec!r}"))
        elif not isinstance(rec.get("run_id"), str) or not rec["run_id"]:
            problems.append((i, "run_id missing"))
    return problems


def _by_span_keys(model: type[Span] | type[SpanUpdate], project_id: int, keys: set[tuple[str, str]]) -> list:
    """The rows of ``model`` (Span or SpanUpdate) for these (trace id, span id) pairs, in id order.

    On PostgreSQL the pairs are joined as two arrays unnested side by side: one index probe per pair.
    (``trace_id IN (…) AND span_id IN (…)`` makes the btree walk every trace id x span id combination:
    4 s for 400 traces x 4,000 spans on a table of a million spans.)"""
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(model._meta.db_table)
        pairs = sorted(keys)
        return list(model.objects.raw(
            f"SELECT r.* FROM {table} r JOIN unnest(%s::varchar[], %s::varchar[]) AS k(trace_id, span_id) "
            f"ON r.trace_id = k.trace_id AND r.span_id = k.span_id WHERE r.project_id = %s ORDER BY r.id",
            [[t for t, _ in pairs], [sp for _, sp in pairs], project_id]))
    rows = model.objects.filter(project_id=project_id, trace_id__any_of={t for t, _ in keys},
                                span_id__any_of={sp for _, sp in keys}).order_by("id")
    return [row for row in rows if (row.trace_id, row.span_id) in keys]


def _apply(project_id: int, items: list[tuple[IngestBatch, dict]], changes: RunChanges) -> None:
    """Apply one project's records (in arrival order) inside the caller's transaction."""
    now = timezone.now()

    # 1. The runs touched: create placeholders for unknown ones, then lock them all (ordered by pk).
    first_seen: dict[str, tuple[IngestBatch, dict]] = {}
    earliest: dict[str, str] = {}
    for batch, rec in items:
        run_id = rec["run_id"]
        first_seen.setdefault(run_id, (batch, rec))
        when = (rec.get("started_at") if rec["op"] == "run.start"
                else rec["span"].get("start_time") if rec["op"] == "span" else None)
        if when and (run_id not in earliest or when < earliest[run_id]):
            earliest[run_id] = when
    run_ids = list(first_seen)
    known = set(Run.objects.filter(project_id=project_id, run_id__any_of=run_ids).values_list("run_id", flat=True))
    placeholders = [
        {"project_id": project_id, "run_id": run_id,
         "trace_id": first_seen[run_id][1].get("trace_id") or trace_id_for_run(run_id),
         "api_key_id": first_seen[run_id][0].api_key_id, "status": Run.Status.RUNNING,
         "started_at": parse_time(earliest[run_id]) if run_id in earliest else now}
        for run_id in run_ids if run_id not in known
    ]
    insert_rows_ignoring_conflicts(Run, placeholders)
    runs = {r.run_id: r for r in Run.objects.select_for_update().filter(project_id=project_id, run_id__any_of=run_ids)
            .order_by("pk")}
    dirty: set[str] = set()

    # 2. Span state before this batch, for every span the batch touches.
    keys: set[tuple[str, str]] = set()
    for _, rec in items:
        if rec["op"] == "span":
            keys.add((runs[rec["run_id"]].trace_id, rec["span"]["span_id"]))
        elif rec["op"] == "span.update":
            keys.add((runs[rec["run_id"]].trace_id, rec["span_id"]))
    stored: dict[tuple[str, str], Span] = {}
    prior_updates: dict[tuple[str, str], list[dict]] = defaultdict(list)
    if keys:
        for span in _by_span_keys(Span, project_id, keys):
            stored[(span.trace_id, span.span_id)] = span
        for upd in _by_span_keys(SpanUpdate, project_id, keys):
            prior_updates[(upd.trace_id, upd.span_id)].append(upd.fields)
    base: dict[tuple[str, str], dict] = {k: span_to_record(s) for k, s in stored.items()}
    before = {k: merge_span(base[k], prior_updates[k]) if k in base else None for k in keys}
    new_updates: dict[tuple[str, str], list[dict]] = defaultdict(list)
    key_run: dict[tuple[str, str], Run] = {}

    # 3. Apply records in order.
    new_spans: list[dict] = []
    update_rows: list[dict] = []
    parent_refs: dict[str, str] = {}
    for batch, rec in items:
        run = runs[rec["run_id"]]
        op = rec["op"]
        if run.status == Run.Status.LOST and run.error_code == LOST_ERROR_CODE and op != "run.finish" and not (
                op == "span" and (run.trace_id, rec["span"]["span_id"]) in base):
            # Declared lost by the housekeeping sweep, yet something new came: it is alive after all.
            run.status, run.error_code, run.error_details = Run.Status.RUNNING, "", None
            dirty.add(run.run_id)
        if op == "run.start" and rec.get("fill"):
            # Run fields told by a span other than the root (OTLP): fill blanks, change nothing set.
            for key in ("agent_name", "agent_version", "end_user", "session_id"):
                if rec.get(key) and not getattr(run, key):
                    setattr(run, key, rec[key])
            if rec.get("metadata"):
                run.metadata = {**rec["metadata"], **(run.metadata or {})}
            dirty.add(run.run_id)
        elif op == "run.start":
            run.start_received = True
            run.agent_name = rec.get("agent_name", "") or run.agent_name
            run.agent_version = rec.get("agent_version", "") or run.agent_version
            run.end_user = rec.get("end_user", "") or run.end_user
            run.session_id = rec.get("session_id", "") or run.session_id
            if rec.get("input") is not None:
                run.input = rec["input"]
            run.metadata = {**(run.metadata or {}), **(rec.get("metadata") or {})}
            run.started_at = parse_time(rec["started_at"])
            if run.api_key_id is None:
                run.api_key_id = batch.api_key_id
            if not run.is_terminal:
                run.status = rec.get("status", Run.Status.RUNNING)
            if rec.get("parent_run_id"):
                run.parent_run_ref = rec["parent_run_id"]
                parent_refs[run.run_id] = rec["parent_run_id"]
            dirty.add(run.run_id)
        elif op == "span":
            key = (run.trace_id, rec["span"]["span_id"])
            if key in base:
                continue  # already stored (a re-send): spans are immutable, the first one stands
            base[key] = rec["span"]
            key_run[key] = run
            new_spans.append(_span_row(rec["span"], project_id=project_id, run=run, trace_id=run.trace_id,
                                       batch_id=batch.pk))
            changes.new_spans[run.pk].append(key[1])
        elif op == "span.update":
            key = (run.trace_id, rec["span_id"])
            fields = dict(rec["fields"])
            if rec.get("at"):
                fields.setdefault("events", [])
                fields["events"] = [*fields["events"], {"name": "controlplane.span.updated", "time": rec["at"],
                                                        "attributes": {"fields": sorted(rec["fields"])}}]
            new_updates[key].append(fields)
            key_run.setdefault(key, run)
            update_rows.append({"project_id": project_id, "run_id": run.pk, "trace_id": key[0], "span_id": key[1],
                                "fields": fields, "batch_id": batch.pk})
            changes.updated_spans[run.pk].append(key[1])
        elif op == "run.finish":
            run.status = rec["status"]
            run.ended_at = parse_time(rec["ended_at"])
            if rec.get("output") is not None:
                run.output = rec["output"]
            run.error_code = rec.get("error_code", "") or run.error_code
            if rec.get("error_details") is not None:
                run.error_details = rec["error_details"]
            if rec.get("failing_span_id"):
                run.failing_span_id = rec["failing_span_id"]
            run.derive_status = bool(rec.get("derive_status"))
            changes.finished.add(run.pk)
            dirty.add(run.run_id)

    # 4. Store the log (spans, updates), then tool calls.
    span_pk = {(row["trace_id"], row["span_id"]): pk for row, pk in zip(new_spans, insert_rows(Span, new_spans),
                                                                        strict=True)}
    insert_rows(SpanUpdate, update_rows)
    span_pk.update({k: s.pk for k, s in stored.items()})

    after = {k: merge_span(base[k], prior_updates[k] + new_updates[k]) if k in base else None for k in keys}
    existing_tools = {tc.span_id: tc for tc in ToolCall.objects.filter(span_id__in=[s.pk for s in stored.values()])}
    tools_new: list[dict] = []
    tools_changed: list[ToolCall] = []
    for key in keys:
        run = key_run.get(key)
        if run is None:
            continue
        eff, prev = after[key], before[key]
        if eff is not None:
            # Run totals move by the difference this batch made to the effective span.
            delta = [a - b for a, b in zip(_contribution(eff), _contribution(prev), strict=True)]
            if any(delta):
                for name, d in zip(TOKEN_FIELDS, delta[:len(TOKEN_FIELDS)], strict=True):
                    # Each count is bounded at the door; a run's sum saturates rather than overflow bigint.
                    setattr(run, name, min(getattr(run, name) + d, BIGINT_MAX))
                run.span_count += delta[len(TOKEN_FIELDS)]
                run.error_span_count += delta[len(TOKEN_FIELDS) + 1]
                dirty.add(run.run_id)
            for value, bucket in ((eff.get("model"), "models_used"), (eff.get("response_model"), "models_used"),
                                  (eff.get("provider"), "providers_used")):
                if value and value not in getattr(run, bucket):
                    setattr(run, bucket, [*getattr(run, bucket), value])
                    dirty.add(run.run_id)
            if not run.start_received and eff.get("start_time"):
                start = parse_time(eff["start_time"])
                if start < run.started_at:
                    run.started_at = start
                    dirty.add(run.run_id)
            if eff.get("tool") and eff["tool"].get("name") and eff != prev:
                tool = eff["tool"]
                values = dict(name=tool["name"], call_id=tool.get("call_id", ""), arguments=tool.get("arguments"),
                              result=tool.get("result"), status=_tool_status(eff), latency_ms=_latency_ms(eff),
                              error=tool.get("error") or (eff.get("status_message", "") if eff.get("status") == "error"
                                                          else ""),
                              started_at=parse_time(eff["start_time"]))
                pk = span_pk[key]
                if pk in existing_tools:
                    tc = existing_tools[pk]
                    for k, v in values.items():
                        setattr(tc, k, v)
                    tools_changed.append(tc)
                else:
                    tools_new.append({"project_id": project_id, "run_id": run.pk, "span_id": pk, **values})
        run.last_span_at = now
        dirty.add(run.run_id)
    insert_rows(ToolCall, tools_new)
    if tools_changed:
        ToolCall.objects.bulk_update(tools_changed, ["name", "call_id", "arguments", "result", "status", "latency_ms",
                                                     "error", "started_at"])

    # 5. Links between runs, in both arrival orders.
    if parent_refs:
        parents = dict(Run.objects.filter(project_id=project_id, run_id__in=set(parent_refs.values()))
                       .values_list("run_id", "pk"))
        for run_id, ref in parent_refs.items():
            runs[run_id].parent_run_id = parents.get(ref)
    if placeholders:
        # Children that named one of the new runs as parent before it existed.
        waiting = list(Run.objects.filter(project_id=project_id, parent_run_ref__any_of=run_ids,
                                          parent_run__isnull=True).exclude(run_id__any_of=run_ids))
        for child in waiting:
            child.parent_run_id = runs[child.parent_run_ref].pk
        Run.objects.bulk_update(waiting, ["parent_run"])

    # 6. Derived run fields, then save the runs.
    def derived(run: Run) -> bool:
        return run.derive_status and run.status in (Run.Status.COMPLETED, Run.Status.FAILED)

    failing = _failing_spans([run.pk for run in (runs[r] for r in dirty) if (
        run.error_span_count if derived(run) else run.status == Run.Status.FAILED and not run.failing_span_id)])
    for run_id in dirty:
        run = runs[run_id]
        if run.ended_at is not None and run.started_at is not None:
            run.duration_ms = max((run.ended_at - run.started_at).total_seconds() * 1000, 0.0)
        if derived(run):
            # The root ended OK (OTLP): the run failed if an error inside it was never recovered.
            run.failing_span_id = failing.get(run.pk, "")
            run.status = Run.Status.FAILED if run.failing_span_id else Run.Status.COMPLETED
        elif run.status == Run.Status.FAILED and not run.failing_span_id:
            run.failing_span_id = failing[run.pk]
        run.updated_at = now
        changes.runs[run.pk] = run
    if dirty:
        _save_runs([runs[r] for r in dirty])


_RUN_FIELDS = ["agent_name", "agent_version", "end_user", "api_key", "session_id", "parent_run", "parent_run_ref",
               "status", "start_received", "started_at", "ended_at", "duration_ms", "input", "output", "metadata",
               "models_used", "providers_used", *TOKEN_FIELDS, "error_code", "error_details", "failing_span_id",
               "span_count", "error_span_count", "last_span_at", "derive_status", "updated_at"]


def _save_runs(runs: list[Run]) -> None:
    """Write every derived field of the runs touched (one UPDATE per 500 runs on PostgreSQL)."""
    update_objects(Run, runs, _RUN_FIELDS)


def _failing_spans(run_pks: list[int]) -> dict[int, str]:
    """Per run, the latest error span that no retry or fallback recovered ('' if none). Three queries
    for all the runs together (the spans that matter, their late updates, the spans only updates name)."""
    if not run_pks:
        return {}
    spans: dict[int, dict[str, Span]] = defaultdict(dict)
    for s in Span.objects.filter(run_id__in=run_pks).filter(Q(status="error") | ~Q(retry_of="") | ~Q(fallback_of="")):
        spans[s.run_id][s.span_id] = s
    updates: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for run_pk, span_id, fields in (SpanUpdate.objects.filter(run_id__in=run_pks).order_by("id")
                                    .values_list("run_id", "span_id", "fields")):
        updates[(run_pk, span_id)].append(fields)
    unseen = {(r, sid) for r, sid in updates if sid not in spans[r]}
    if unseen:
        for s in Span.objects.filter(run_id__in={r for r, _ in unseen}, span_id__in={sid for _, sid in unseen}):
            if (s.run_id, s.span_id) in unseen:
                spans[s.run_id][s.span_id] = s
    out = {}
    for run_pk in run_pks:
        eff = {sid: merge_span(span_to_record(s), updates.get((run_pk, sid), [])) for sid, s in spans[run_pk].items()}
        recovered = {e.get("retry_of") or e.get("fallback_of") for e in eff.values()
                     if (e.get("retry_of") or e.get("fallback_of")) and e.get("status") != "error"}
        failed = [e for sid, e in eff.items() if e.get("status") == "error" and sid not in recovered]
        # A failed root only reports what failed inside it: name the inner error when there is one.
        failed = [e for e in failed if e.get("parent_span_id")] or failed
        out[run_pk] = max(failed, key=lambda e: (e.get("end_time") or e["start_time"]))["span_id"] if failed else ""
    return out


def _redactors(project_ids) -> dict[int, Any]:
    """Each project's redactor (None where it would change nothing)."""
    out = {}
    for project in Project.objects.filter(pk__in=set(project_ids)).only(
            "pk", "redaction_enabled", "redaction_patterns", "redaction_exempt_attributes"):
        redactor = project.redactor()
        out[project.pk] = redactor if redactor.active else None
    return out


def _commit_without_flush() -> None:
    """Let the current transaction commit without waiting for its WAL flush (PostgreSQL).

    Safe for the projection and its claims, and only for them: the accepted batch is already durable
    (its INSERT commits normally), so a crash that loses a projection's last commits loses nothing but
    the work, and the batch's lease expires and it is projected again. It saves a disk flush wait per
    transaction on the worker's path."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _project(batches: list[IngestBatch], changes: RunChanges) -> None:
    """Decode, redact and apply the batches; nothing unredacted reaches Run / Span / ToolCall."""
    _commit_without_flush()
    by_project: dict[int, list[tuple[IngestBatch, dict]]] = defaultdict(list)
    redactors = _redactors(b.project_id for b in batches)
    for batch in batches:
        redactor = redactors.get(batch.project_id)
        for rec in _decode(batch):
            by_project[batch.project_id].append((batch, redactor.record(rec) if redactor else rec))
    for project_id in sorted(by_project):
        _apply(project_id, by_project[project_id], changes)
    IngestBatch.objects.filter(pk__in=[b.pk for b in batches]).update(
        status=IngestBatch.Status.DONE, payload=None, raw=None, lease_expires_at=None, processed_at=timezone.now(),
        error_code="", error="")


def _claim(batch_id: int | None, limit: int, item_limit: int | None = None) -> list[IngestBatch]:
    """Lease up to ``limit`` batches holding up to ``item_limit`` records together (at least one batch):
    ``batch_id`` first, then the oldest claimable. Small transactions keep every worker busy to the end."""
    item_limit = item_limit or getattr(settings, "TRACES_PROJECT_ITEM_LIMIT", 2000)
    now = timezone.now()
    claimable = IngestBatch.objects.filter(
        Q(status=IngestBatch.Status.PENDING, not_before__isnull=True)
        | Q(status=IngestBatch.Status.PENDING, not_before__lte=now)
        | Q(status=IngestBatch.Status.PROCESSING, lease_expires_at__lt=now)
    )
    with transaction.atomic():
        _commit_without_flush()
        found: list[tuple[int, int]] = []
        if batch_id is not None:
            found = list(claimable.filter(pk=batch_id).select_for_update(skip_locked=True)
                         .values_list("pk", "item_count"))
        if len(found) < limit:
            found += list(claimable.exclude(pk__in=[pk for pk, _ in found]).order_by("id")
                          .select_for_update(skip_locked=True).values_list("pk", "item_count")[: limit - len(found)])
        ids: list[int] = []
        items = 0
        for pk, count in found:
            if ids and items + count > item_limit:
                break
            ids.append(pk)
            items += count
        if not ids:
            return []
        IngestBatch.objects.filter(pk__in=ids).update(status=IngestBatch.Status.PROCESSING,
                                                      attempts=F("attempts") + 1,
                                                      lease_expires_at=now + _lease())
    return list(IngestBatch.objects.filter(pk__in=ids).order_by("id"))


# Faults of the database or the connection to it, not of the data: the batch is retried as a whole.
TRANSIENT = (OperationalError, InterfaceError)


def _dead(batch: IngestBatch, code: str, message: str) -> None:
    logger.error("batch %s dead-lettered (%s): %s", batch.pk, code, message)
    IngestBatch.objects.filter(pk=batch.pk).update(status=IngestBatch.Status.DEAD, error_code=code,
                                                   error=message[:10_000], lease_expires_at=None,
                                                   processed_at=timezone.now())


def _retry_later(batch: IngestBatch, exc: Exception) -> None:
    delay = min(300, 5 * 2 ** max(batch.attempts - 1, 0))
    logger.warning("batch %s failed (attempt %s), retrying in %ss: %r", batch.pk, batch.attempts, delay, exc)
    IngestBatch.objects.filter(pk=batch.pk).update(status=IngestBatch.Status.PENDING, error_code="projection_error",
                                                   error=repr(exc)[:10_000], lease_expires_at=None,
                                                   not_before=timezone.now() + timedelta(seconds=delay))


def _settle(batch: IngestBatch, outcome: Callable[..., None], *args: Any) -> None:
    """Record a batch's outcome (``_dead``, ``_retry_later``); if the database fails even for that, leave
    the batch leased: its lease expires and the sweeper takes it again. Never an unhandled task error."""
    try:
        outcome(batch, *args)
    except TRANSIENT as exc:
        logger.warning("batch %s: could not record its outcome (%r); its lease will expire", batch.pk, exc)


def _raw_record(rec: Any) -> bytes:
    """A record as ASCII JSON: escapes hold what a JSON column refuses (NUL, a lone surrogate, NaN)."""
    return json.dumps(rec, ensure_ascii=True, default=repr).encode()


def _preview(rec: Any, redactor) -> str:
    try:
        shown = redactor.record(rec) if redactor is not None and isinstance(rec, dict) else rec
        text = json.dumps(shown, ensure_ascii=True, default=repr)
    except Exception:  # noqa: BLE001 - the preview is a courtesy; the reason is in ``error``
        return ""
    return text[:2000]


def _merge_changes(into: RunChanges, other: RunChanges) -> None:
    into.runs.update(other.runs)
    for pk, ids in other.new_spans.items():
        into.new_spans[pk].extend(ids)
    for pk, ids in other.updated_spans.items():
        into.updated_spans[pk].extend(ids)
    into.finished |= other.finished


def _project_isolating(batch: IngestBatch) -> RunChanges:
    """Project a batch that failed as a whole, setting aside only the records at fault.

    The records are applied in halves, each in a savepoint; a half that fails is split again, down to
    single records, which become DeadRecords with their reason. What is stored keeps the batch's order.
    With k bad records among n, that is about 2k·log2(n) attempts. A transient fault propagates
    (the whole batch is retried)."""
    changes = RunChanges()
    with transaction.atomic():
        _commit_without_flush()
        recs = _decode(batch)
        redactor = _redactors([batch.project_id]).get(batch.project_id)
        dead: list[DeadRecord] = []

        def attempt(chunk: list[tuple[int, dict]]) -> None:
            part = RunChanges()
            try:
                with transaction.atomic():
                    items = [(batch, redactor.record(rec) if redactor else rec) for _, rec in chunk]
                    _apply(batch.project_id, items, part)
            except TRANSIENT:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the record did, isolate it
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    attempt(chunk[:mid])
                    attempt(chunk[mid:])
                    return
                position, rec = chunk[0]
                code = "invalid_record" if isinstance(exc, (RecordError, KeyError, TypeError, ValueError)) \
                    else "unstorable_record"
                dead.append(DeadRecord(
                    project_id=batch.project_id, api_key_id=batch.api_key_id, batch_public_id=batch.public_id,
                    batch_pk=batch.pk, source=batch.source, position=position,
                    op=str(rec.get("op", ""))[:16] if isinstance(rec, dict) else "",
                    run_ref=str(rec.get("run_id", ""))[:128] if isinstance(rec, dict) else "",
                    raw=_raw_record(rec), preview=_preview(rec, redactor), error_code=code,
                    error=f"{type(exc).__name__}: {exc}"[:10_000]))
                return
            _merge_changes(changes, part)

        attempt(list(enumerate(recs)))
        DeadRecord.objects.bulk_create(dead)
        for record in dead:
            logger.error("batch %s: record %s dead-lettered (%s): %s", batch.pk, record.position, record.error_code,
                         record.error[:500])
        IngestBatch.objects.filter(pk=batch.pk).update(
            status=IngestBatch.Status.DONE, payload=None, raw=None, lease_expires_at=None,
            processed_at=timezone.now(), error_code="records_dead" if dead else "",
            error=f"{len(dead)} of {len(recs)} records dead-lettered (see dead records)" if dead else "")
    return changes


def _project_one(batch: IngestBatch) -> RunChanges | None:
    """Project one batch in its own transaction. If it fails for its data, the records at fault are set
    aside and the rest stored; an undecodable batch is dead-lettered whole; a database fault retries."""
    if batch.attempts > _max_attempts():
        _settle(batch, _dead, "gave_up", f"projection did not complete after {batch.attempts - 1} attempts "
                                         f"(last error: {batch.error or 'worker lost'})")
        return None
    changes = RunChanges()
    try:
        with transaction.atomic():
            _project([batch], changes)
        return changes
    except _PoisonBatch as exc:
        _settle(batch, _dead, exc.code, str(exc))
        return None
    except TRANSIENT as exc:
        _settle(batch, _retry_later, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - the data (or a bug on some records): isolate below
        logger.warning("batch %s failed as a whole (%r); isolating the records at fault", batch.pk, exc)
    try:
        return _project_isolating(batch)
    except _PoisonBatch as exc:
        _settle(batch, _dead, exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - transient, or a bug outside any one record: retry, then give up
        _settle(batch, _retry_later, exc)
    return None


class _Heartbeat:
    """Renews the leases of the batches a worker is projecting, every third of a lease, from a thread
    with its own connection. Leases can then be short, so a killed worker's batches are taken over
    within a lease and a sweep, while a long projection keeps its own. A renewal touches only batches
    still PROCESSING (one that committed meanwhile is DONE and stays so)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        self.thread = threading.Thread(target=self._run, name="traces-lease-heartbeat", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        from django.db import connections

        try:
            while not self.stop.wait(settings.TRACES_LEASE_SECONDS / 3):
                try:
                    IngestBatch.objects.filter(pk__in=self.ids, status=IngestBatch.Status.PROCESSING).update(
                        lease_expires_at=timezone.now() + _lease())
                except Exception as exc:  # noqa: BLE001 - a missed renewal costs at worst a duplicate attempt
                    logger.warning("lease heartbeat for batches %s failed: %r", self.ids[:5], exc)
        finally:
            connections.close_all()


def inbox_project(*, batch_id: int | None = None, limit: int | None = None) -> int:
    """Lease up to ``limit`` batches (``batch_id`` first) and project them. Returns how many it claimed.

    The claimed batches are projected in one transaction; if that fails, each is projected alone so
    one bad batch cannot hold back the others.
    """
    limit = limit or getattr(settings, "TRACES_PROJECT_BATCH_LIMIT", 20)
    batches = _claim(batch_id, limit)
    if not batches:
        return 0
    with _Heartbeat([b.pk for b in batches]):
        results = _project_claimed(batches)
    try:
        left = IngestBatch.objects.filter(pk__in=[b.pk for b in batches], status__in=[
            IngestBatch.Status.DONE, IngestBatch.Status.DEAD]).aggregate(n=Sum("item_count"))["n"]
        admission.backlog_add(-(left or 0))
    except TRANSIENT:
        pass  # the sweeper's reconcile corrects the counter
    for changes in results:
        if changes is not None:
            publish_changes(changes)
    return len(batches)


def _project_claimed(batches: list[IngestBatch]) -> list[RunChanges | None]:
    results: list[RunChanges | None] = []
    together = [b for b in batches if b.attempts <= _max_attempts()]
    if len(together) > 1 and len(together) == len(batches):
        changes = RunChanges()
        try:
            with transaction.atomic():
                _project(batches, changes)
            results.append(changes)
        except Exception as exc:  # noqa: BLE001 - isolate the culprit below
            logger.info("projecting %s batches together failed (%r); one by one", len(batches), exc)
            results = [_project_one(b) for b in batches]
    else:
        results = [_project_one(b) for b in batches]
    return results


def inbox_drain(*, batch_id: int | None = None, budget_seconds: float) -> int:
    """Project claim after claim (``batch_id`` in the first) until nothing is claimable or the budget is
    spent. Returns how many batches it claimed. Every worker drains side by side (claims skip locked
    batches), so a burst is shared out in small transactions rather than left to the sweeper."""
    deadline = time.monotonic() + budget_seconds
    total = n = inbox_project(batch_id=batch_id)
    while n and time.monotonic() < deadline:
        n = inbox_project()
        total += n
    return total


def _run_summary(run: Run) -> dict:
    return {
        "id": run.run_id, "status": run.status, "agent": run.agent_name, "end_user": run.end_user,
        "session_id": run.session_id, "started_at": run.started_at.isoformat() if run.started_at else None,
        "ended_at": run.ended_at.isoformat() if run.ended_at else None, "span_count": run.span_count,
        "error_span_count": run.error_span_count, "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
    }


def publish_changes(changes: RunChanges) -> None:
    """Broadcast and signal what changed (the transaction has committed: the data is readable)."""
    if not changes.runs:
        return
    messages = []
    for pk, run in changes.runs.items():
        summary = _run_summary(run)
        messages.append((project_runs_group(run.project_id), {"type": "run.updated", "run": summary}))
        messages.append((run_group(pk), {"type": "run.updated", "run": summary,
                                         "new_spans": changes.new_spans.get(pk, []),
                                         "updated_spans": changes.updated_spans.get(pk, [])}))
    live.publish_many(messages)
    for pk, run in changes.runs.items():
        try:
            signals.run_changed.send(sender=Run, run=run, new_span_ids=changes.new_spans.get(pk, []),
                                     updated_span_ids=changes.updated_spans.get(pk, []))
            if pk in changes.finished:
                signals.run_finished.send(sender=Run, run=run)
        except Exception:  # noqa: BLE001 - a receiver's bug must not undo or stall ingest
            logger.exception("a receiver of a traces signal failed for run %s", pk)


def inbox_sweep() -> dict[str, int]:
    """Beat task body: project whatever is claimable (lost enqueues, expired leases, retries due),
    delete projected batches older than the idempotency window and dead ones (which keep their
    payload for inspection) after TRACES_DEAD_RETENTION_DAYS."""
    projected = inbox_drain(budget_seconds=getattr(settings, "TRACES_SWEEP_BUDGET_SECONDS", 30))
    now = timezone.now()
    done_cutoff = now - timedelta(hours=getattr(settings, "TRACES_INBOX_RETENTION_HOURS", 24))
    dead_cutoff = now - timedelta(days=getattr(settings, "TRACES_DEAD_RETENTION_DAYS", 7))
    deleted = 0
    for status, cutoff in ((IngestBatch.Status.DONE, done_cutoff), (IngestBatch.Status.DEAD, dead_cutoff)):
        while True:
            ids = list(IngestBatch.objects.filter(status=status, processed_at__lt=cutoff)
                       .values_list("pk", flat=True)[:1000])
            if not ids:
                break
            deleted += IngestBatch.objects.filter(pk__in=ids).delete()[0]
    while ids := list(DeadRecord.objects.filter(created_at__lt=dead_cutoff).values_list("pk", flat=True)[:1000]):
        deleted += DeadRecord.objects.filter(pk__in=ids).delete()[0]
    return {"projected": projected, "deleted": deleted, "backlog": admission.backlog_reconcile()}


def seconds_until_leases_expire() -> float | None:
    """Seconds until the last lease held on a batch runs out (None when no batch is leased)."""
    latest = IngestBatch.objects.filter(status=IngestBatch.Status.PROCESSING).aggregate(
        latest=Max("lease_expires_at"))["latest"]
    return None if latest is None else max((latest - timezone.now()).total_seconds(), 0.0)


# --- dead letters: counted, and re-projected once their cause is fixed ---------------------------------


def dead_letter_counts() -> dict[str, int]:
    """Dead-lettered batches and records waiting for a look (for /healthz)."""
    return {"batches": IngestBatch.objects.filter(status=IngestBatch.Status.DEAD).count(),
            "records": DeadRecord.objects.filter(status=DeadRecord.Status.DEAD).count()}


def dead_record_reproject(record: DeadRecord, *, actor: Actor) -> bool:
    """Project one dead record again (after the code or data that failed it was fixed), with the
    project's redaction, in its own transaction. True when it is stored now; otherwise its reason is
    updated and it stays dead."""
    changes = RunChanges()
    batch = IngestBatch(pk=record.batch_pk, project_id=record.project_id, api_key_id=record.api_key_id,
                        public_id=record.batch_public_id, source=record.source)
    try:
        rec = json.loads(bytes(record.raw))
        with transaction.atomic():
            locked = DeadRecord.objects.select_for_update().filter(pk=record.pk, status=DeadRecord.Status.DEAD)
            if not locked.exists():
                return False  # someone else re-projected it
            redactor = _redactors([record.project_id]).get(record.project_id)
            for _, problem in _decode_problems([rec]):
                raise _PoisonBatch("invalid_record", problem)
            _apply(record.project_id, [(batch, redactor.record(rec) if redactor else rec)], changes)
            locked.update(status=DeadRecord.Status.REPROJECTED, reprojected_at=timezone.now())
            audit_record(actor=actor, action="traces.dead_record_reprojected", object_type="traces.deadrecord",
                         object_id=record.pk, object_repr=str(record), project_id=record.project_id,
                         after={"batch_id": str(record.batch_public_id), "position": record.position,
                                "op": record.op, "run_id": record.run_ref})
    except TRANSIENT:
        raise
    except Exception as exc:  # noqa: BLE001 - still failing: say why, keep it
        DeadRecord.objects.filter(pk=record.pk).update(error=f"{type(exc).__name__}: {exc}"[:10_000])
        return False
    publish_changes(changes)
    return True


@transaction.atomic
def batch_reproject(batch: IngestBatch, *, actor: Actor) -> bool:
    """Put a dead-lettered batch back in the inbox (fresh attempts) and ask a worker to project it."""
    n = IngestBatch.objects.filter(pk=batch.pk, status=IngestBatch.Status.DEAD).exclude(payload=None, raw=None).update(
        status=IngestBatch.Status.PENDING, attempts=0, not_before=None, lease_expires_at=None, error_code="",
        error="", processed_at=None)
    if n:
        audit_record(actor=actor, action="traces.batch_reprojected", object_type="traces.ingestbatch",
                     object_id=batch.pk, object_repr=str(batch), project_id=batch.project_id,
                     before={"error_code": batch.error_code, "error": batch.error[:500]},
                     after={"batch_id": str(batch.public_id)})
        transaction.on_commit(lambda: _enqueue(batch.pk), robust=True)
    return bool(n)


def run_totals_rebuild(run: Run) -> dict[str, Any]:
    """Recompute a run's derived totals from its spans and updates (repair, and a check in tests)."""
    updates: dict[str, list[dict]] = defaultdict(list)
    for span_id, fields in SpanUpdate.objects.filter(run=run).order_by("id").values_list("span_id", "fields"):
        updates[span_id].append(fields)
    totals = dict.fromkeys([*TOKEN_FIELDS, "span_count", "error_span_count"], 0)
    models_used: list[str] = []
    providers_used: list[str] = []
    for span in Span.objects.filter(run=run).order_by("start_time", "id"):
        eff = merge_span(span_to_record(span), updates.get(span.span_id, []))
        for name, value in zip([*TOKEN_FIELDS, "span_count", "error_span_count"], _contribution(eff), strict=True):
            totals[name] += value
        for value, bucket in ((eff.get("model"), models_used), (eff.get("response_model"), models_used),
                              (eff.get("provider"), providers_used)):
            if value and value not in bucket:
                bucket.append(value)
    return {**totals, "models_used": sorted(models_used), "providers_used": sorted(providers_used)}
