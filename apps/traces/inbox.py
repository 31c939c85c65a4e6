"""The inbox: every write is stored durably before it is answered, then projected by a worker.

Accept (``batch_accept``) is the only thing a request waits for: one insert into the inbox, in the
request's transaction, with the ``Idempotency-Key`` check. A worker then leases batches (``claim``),
hands them to the projection (``projection.apply_batches``) in one transaction per group of batches,
and marks them done in that same transaction, so a worker killed halfway leaves nothing behind but an
expiring lease (renewed meanwhile by a heartbeat). A batch that fails for its data has its bad
records set aside as dead records and the rest stored; one that no retry can project is dead-lettered
with its reason; a database fault retries it later. Nothing accepted is dropped.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connections, transaction
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from apps.audit.services import Actor, audit_record
from apps.common.errors import ApiError, ErrorCode

from . import admission, projection
from .live import RunChanges, publish_changes
from .models import DeadRecord, IngestBatch
from .records import RecordError

logger = logging.getLogger(__name__)

# The Celery task that drains the inbox (defined in tasks.py; sent by name so this module never
# imports the tasks module, which imports it).
DRAIN_TASK = "traces.inbox_drain"

# Faults of the database or the connection to it, not of the data: the batch is retried as a whole.
TRANSIENT = (OperationalError, InterfaceError)


def _lease() -> timedelta:
    return timedelta(seconds=settings.TRACES_LEASE_SECONDS)


# --- accept ---------------------------------------------------------------------------------------


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
    # Inside a caller's transaction (the gateway's) a write without an Idempotency-Key takes no savepoint:
    # nothing in it raises but a database fault, which fails the caller's transaction anyway.
    with transaction.atomic(savepoint=bool(idempotency_key)):
        if idempotency_key:
            existing = IngestBatch.objects.filter(project=project, idempotency_key=idempotency_key).first()
            if existing is not None:
                return _replay(existing, request_hash), True
        batch = IngestBatch(project=project, api_key=api_key, source=source, kind=kind, payload=records,
                            raw=raw, item_count=item_count, idempotency_key=idempotency_key or None,
                            request_hash=request_hash, response={**response})
        if not idempotency_key:
            batch.save()
        else:
            try:
                with transaction.atomic():  # a savepoint: a concurrent twin may win the unique key
                    batch.save()
            except IntegrityError:
                existing = IngestBatch.objects.get(project=project, idempotency_key=idempotency_key)
                return _replay(existing, request_hash), True
        transaction.on_commit(lambda: enqueue(batch.pk), robust=True)
        # Counted now rather than on commit, so that concurrent requests see it as soon as possible; one
        # that rolls back is over-counted until the sweeper's reconcile (it sheds early, never late).
        admission.backlog_add(item_count)
    return {**batch.response, "batch_id": str(batch.public_id)}, False


class _Enqueuer:
    """One long-lived thread per process sends the drain tasks.

    A request never waits on the broker (an unreachable one would cost it the connection timeout),
    and Celery's per-thread result backend is built once rather than in every request thread (it was
    a large share of the web process's CPU under load). Ids waiting together go out as one task per
    TRACES_PROJECTION_BATCH_LIMIT of them: a task leases up to that many batches, its own first. An id
    lost here (the process exits first, the broker is down) costs promptness only: the batch is
    durable and the sweeper projects it.
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
        last = 0.0
        while True:
            ids = [self._queue.get()]
            # Under a stream of small batches (the gateway writes one per model call), send at most one
            # task every TRACES_ENQUEUE_PACE_SECONDS: the ids that arrive meanwhile go with it (a task
            # leases up to TRACES_PROJECTION_BATCH_LIMIT batches) instead of a broker round trip each.
            # An isolated batch is sent at once.
            wait = last + settings.TRACES_ENQUEUE_PACE_SECONDS - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last = time.monotonic()
            try:
                while True:
                    ids.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            # If the broker refuses one task, the rest wait for the sweeper rather than each waiting
            # out the connection timeout.
            for first in ids[::settings.TRACES_PROJECTION_BATCH_LIMIT]:
                if not _send_drain(first):
                    break


_enqueuer = _Enqueuer()


def enqueue(batch_id: int) -> None:
    """Ask a worker to project now (asynchronously; see _Enqueuer)."""
    _enqueuer.put(batch_id)


def _send_drain(batch_id: int) -> bool:
    try:
        current_app.send_task(DRAIN_TASK, kwargs={"batch_id": batch_id}, queue="ingest", retry=False)
    except Exception as exc:  # noqa: BLE001 - the batch is durable; only its promptness suffers
        logger.warning("could not enqueue projection of batch %s (the sweeper will): %r", batch_id, exc)
        return False
    return True


# --- claim, lease, outcome ----------------------------------------------------------------------------


def claim(batch_id: int | None, limit: int, item_limit: int | None = None) -> list[IngestBatch]:
    """Lease up to ``limit`` batches holding up to ``item_limit`` records together (at least one batch):
    ``batch_id`` first, then the oldest claimable. Small transactions keep every worker busy to the end."""
    item_limit = item_limit or settings.TRACES_PROJECTION_ITEM_LIMIT
    now = timezone.now()
    claimable = IngestBatch.objects.filter(
        Q(status=IngestBatch.Status.PENDING, not_before__isnull=True)
        | Q(status=IngestBatch.Status.PENDING, not_before__lte=now)
        | Q(status=IngestBatch.Status.PROCESSING, lease_expires_at__lt=now)
    )
    with transaction.atomic():
        projection.commit_without_flush()
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


class Heartbeat:
    """Renews the leases of the batches a worker is projecting, every third of a lease, from a thread
    with its own connection. Leases can then be short, so a killed worker's batches are taken over
    within a lease and a sweep, while a long projection keeps its own. A renewal touches only batches
    still PROCESSING (one that committed meanwhile is DONE and stays so)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self.thread = threading.Thread(target=self._run, name="traces-lease-heartbeat", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        try:
            while not self.stop.wait(settings.TRACES_LEASE_SECONDS / 3):
                try:
                    IngestBatch.objects.filter(pk__in=self.ids, status=IngestBatch.Status.PROCESSING).update(
                        lease_expires_at=timezone.now() + _lease())
                except Exception as exc:  # noqa: BLE001 - a missed renewal costs at worst a duplicate attempt
                    logger.warning("lease heartbeat for batches %s failed: %r", self.ids[:5], exc)
        finally:
            connections.close_all()


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


# --- projecting what was claimed -----------------------------------------------------------------------


def _raw_record(rec: Any) -> bytes:
    """A record as ASCII JSON: escapes hold what a JSON column refuses (NUL, a lone surrogate, NaN)."""
    return json.dumps(rec, ensure_ascii=True, default=repr).encode()


def _preview(rec: Any, redactor) -> str:
    try:
        shown = projection.redacted(rec, redactor) if isinstance(rec, dict) else rec
        text = json.dumps(shown, ensure_ascii=True, default=repr)
    except Exception:  # noqa: BLE001 - the preview is a courtesy; the reason is in ``error``
        return ""
    return text[:2000]


def _apply_isolating(batch: IngestBatch) -> RunChanges:
    """Project a batch that failed as a whole, setting aside only the records at fault.

    The records are applied in halves, each in a savepoint; a half that fails is split again, down to
    single records, which become DeadRecords with their reason. What is stored keeps the batch's order.
    With k bad records among n, that is about 2k·log2(n) attempts. A transient fault propagates
    (the whole batch is retried)."""
    changes = RunChanges()
    with transaction.atomic():
        projection.commit_without_flush()
        recs = projection.decode(batch)
        redactor = projection.redactors([batch.project_id]).get(batch.project_id)
        dead: list[DeadRecord] = []

        def attempt(chunk: list[tuple[int, dict]]) -> None:
            part = RunChanges()
            try:
                with transaction.atomic():
                    items = [(batch, projection.redacted(rec, redactor)) for _, rec in chunk]
                    projection.apply_records(batch.project_id, items, part)
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
            changes.merge(part)

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


def _apply_alone(batch: IngestBatch) -> RunChanges | None:
    """Project one batch in its own transaction. If it fails for its data, the records at fault are set
    aside and the rest stored; an undecodable batch is dead-lettered whole; a database fault retries."""
    if batch.attempts > settings.TRACES_MAX_ATTEMPTS:
        _settle(batch, _dead, "gave_up", f"projection did not complete after {batch.attempts - 1} attempts "
                                         f"(last error: {batch.error or 'worker lost'})")
        return None
    changes = RunChanges()
    try:
        with transaction.atomic():
            projection.apply_batches([batch], changes)
        return changes
    except projection.PoisonBatch as exc:
        _settle(batch, _dead, exc.code, str(exc))
        return None
    except TRANSIENT as exc:
        _settle(batch, _retry_later, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - the data (or a bug on some records): isolate below
        logger.warning("batch %s failed as a whole (%r); isolating the records at fault", batch.pk, exc)
    try:
        return _apply_isolating(batch)
    except projection.PoisonBatch as exc:
        _settle(batch, _dead, exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - transient, or a bug outside any one record: retry, then give up
        _settle(batch, _retry_later, exc)
    return None


def _apply_claimed(batches: list[IngestBatch]) -> list[RunChanges | None]:
    """All together in one transaction; if that fails, each alone, so one bad batch cannot hold back
    the others."""
    together = [b for b in batches if b.attempts <= settings.TRACES_MAX_ATTEMPTS]
    if len(together) > 1 and len(together) == len(batches):
        changes = RunChanges()
        try:
            with transaction.atomic():
                projection.apply_batches(batches, changes)
            return [changes]
        except Exception as exc:  # noqa: BLE001 - isolate the culprit below
            logger.info("projecting %s batches together failed (%r); one by one", len(batches), exc)
    return [_apply_alone(b) for b in batches]


def inbox_step(*, batch_id: int | None = None, limit: int | None = None) -> int:
    """Lease up to ``limit`` batches (``batch_id`` first), project them and publish what changed.
    Returns how many it claimed (0: nothing was claimable)."""
    batches = claim(batch_id, limit or settings.TRACES_PROJECTION_BATCH_LIMIT)
    if not batches:
        return 0
    with Heartbeat([b.pk for b in batches]):
        results = _apply_claimed(batches)
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


def inbox_drain(*, batch_id: int | None = None, budget_seconds: float) -> int:
    """Step after step (``batch_id`` in the first) until nothing is claimable or the budget is spent.
    Returns how many batches it claimed. Every worker drains side by side (claims skip locked
    batches), so a burst is shared out in small transactions rather than left to the sweeper."""
    deadline = time.monotonic() + budget_seconds
    total = n = inbox_step(batch_id=batch_id)
    while n and time.monotonic() < deadline:
        n = inbox_step()
        total += n
    return total


def inbox_sweep() -> dict[str, int]:
    """Beat task body: project whatever is claimable (lost enqueues, expired leases, retries due),
    delete projected batches older than the idempotency window and dead ones (which keep their
    payload for inspection) after TRACES_DEAD_RETENTION_DAYS."""
    projected = inbox_drain(budget_seconds=settings.TRACES_SWEEP_BUDGET_SECONDS)
    now = timezone.now()
    done_cutoff = now - timedelta(hours=settings.TRACES_INBOX_RETENTION_HOURS)
    dead_cutoff = now - timedelta(days=settings.TRACES_DEAD_RETENTION_DAYS)
    deleted = 0
    for status, cutoff in ((IngestBatch.Status.DONE, done_cutoff), (IngestBatch.Status.DEAD, dead_cutoff)):
        while ids := list(IngestBatch.objects.filter(status=status, processed_at__lt=cutoff)
                          .values_list("pk", flat=True)[:1000]):
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
            redactor = projection.redactors([record.project_id]).get(record.project_id)
            for _, problem in projection.decode_problems([rec]):
                raise projection.PoisonBatch("invalid_record", problem)
            projection.apply_records(record.project_id, [(batch, projection.redacted(rec, redactor))], changes)
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
        transaction.on_commit(lambda: enqueue(batch.pk), robust=True)
    return bool(n)
