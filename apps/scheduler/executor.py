"""The worker's side: claim a task under its generation, load its model if the admission asked for it,
run it while a heartbeat keeps its lease and watches for a stop, and write how it ended, all by
conditional updates under that generation.

A message carries a task id and a generation only. The claim (``admitted → running`` where the generation
is the message's) succeeds once: a duplicated or redelivered message, or one sent before a cancel or a
redirect (which bump the generation), finds nothing to claim and exits. A worker killed mid-task stops
renewing its lease; ``sweep`` (the dispatcher's tick) then retries the task under a new generation (up to
its ``max_attempts``) or fails it, so it never runs twice at once: the old worker is gone and, were it
not, its writes would be refused for their old generation.

Cancel and redirect of a running task are cooperative: the heartbeat reads the row every
``SCHEDULER_HEARTBEAT_SECONDS``, and ``should_stop()`` turns true; the handler returns, and the worker
ends the attempt cancelled or puts the task back in the queue on its new backend. A handler that finishes
first has done the work; the task then succeeds (its work done once).
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import live, trace
from .clients import BackendError, client_for
from .handlers import Stopped
from .models import Backend, LoadedModel, QueueTask
from .services import event

logger = logging.getLogger(__name__)

State = QueueTask.State


def _ms(a: datetime | None, b: datetime) -> int | None:
    return None if a is None else max(0, int((b - a).total_seconds() * 1000))


def _lease() -> timedelta:
    return timedelta(seconds=settings.SCHEDULER_LEASE_SECONDS)


def _wake(project_id: int) -> None:
    from .tasks import wake

    wake(project_id)


class _Heartbeat(threading.Thread):
    """Renews the attempt's lease and notices a stop request (or a lost generation)."""

    def __init__(self, pk: int, generation: int):
        super().__init__(daemon=True, name=f"queue-heartbeat-{pk}")
        self.pk, self.generation = pk, generation
        self.stop_requested = threading.Event()
        self.done = threading.Event()

    def check(self) -> None:
        renewed = QueueTask.objects.filter(pk=self.pk, generation=self.generation, state=State.RUNNING).update(
            lease_until=timezone.now() + _lease())
        if not renewed or QueueTask.objects.filter(pk=self.pk, cancel_requested=True).exists():
            self.stop_requested.set()

    def run(self) -> None:
        try:
            while not self.done.wait(settings.SCHEDULER_HEARTBEAT_SECONDS):
                try:
                    self.check()
                except Exception:  # a missed beat costs nothing until the lease runs out
                    logger.warning("queue heartbeat failed for task %s", self.pk, exc_info=True)
        finally:
            close_old_connections()


def claim(pk: int, generation: int, *, worker_id: str = "") -> QueueTask | None:
    now = timezone.now()
    with transaction.atomic():
        claimed = QueueTask.objects.filter(pk=pk, generation=generation, state=State.ADMITTED,
                                           cancel_requested=False).update(
            state=State.RUNNING, started_at=now, attempts=F("attempts") + 1, lease_until=now + _lease(),
            worker_id=worker_id[:64])
        if not claimed:
            return None
        task = QueueTask.objects.select_related("project", "backend", "device", "api_key").get(pk=pk)
        event(task, "started", actor=worker_id and f"worker {worker_id}" or "worker", at=now,
              waited_ms=_ms(task.queued_at, now), detail={"attempt": task.attempts})
        live.publish_task(task)
    return task


def run(pk: int, generation: int, *, worker_id: str = "") -> str:
    """Run one task's attempt; what happened (``nothing`` when there was nothing to claim)."""
    task = claim(pk, generation, worker_id=worker_id)
    if task is None:
        return "nothing"
    beat = _Heartbeat(pk, generation)
    beat.start()
    outcome, result, code, message = "failed", None, "", ""
    try:
        client = client_for(task.backend)
        _load_if_asked(task, client)
        result = client.run(task.kind, task.input, task.model, beat.stop_requested.is_set)
        outcome = "succeeded"
    except Stopped:
        outcome = "stopped"
    except BackendError as exc:
        code, message = exc.code, str(exc)
    except Exception as exc:  # a handler's own failure: the task fails, with its message
        logger.exception("queue task %s failed", task.public_id)
        code, message = "task_error", f"{type(exc).__name__}: {exc}"
    finally:
        beat.done.set()
    return finish(task, generation, outcome=outcome, result=result, code=code, message=message)


def _load_if_asked(task: QueueTask, client) -> None:
    model = LoadedModel.objects.filter(backend=task.backend, model=task.model).first()
    if model is None or model.state != LoadedModel.State.LOADING or model.loading_task_id != task.pk:
        return
    client.load(task.model)
    now = timezone.now()
    LoadedModel.objects.filter(pk=model.pk, state=LoadedModel.State.LOADING).update(
        state=LoadedModel.State.LOADED, loading_task=None, changed_at=now, last_used_at=now)


def finish(task: QueueTask, generation: int, *, outcome: str, result=None, code: str = "", message: str = "") -> str:
    """End the attempt under its generation: succeeded, failed, cancelled (a stop was asked), or back in the
    queue (a stop was asked to move it). Nothing changes when the generation is no longer this attempt's."""
    now = timezone.now()
    with transaction.atomic():
        current = QueueTask.objects.select_for_update().filter(pk=task.pk, generation=generation,
                                                               state=State.RUNNING).first()
        if current is None:
            return "lost"
        backend_name, device_name = task.backend.name, task.device.name
        if outcome == "stopped" or (outcome != "succeeded" and current.cancel_requested):
            outcome = "redirected" if current.redirect_to_id else "cancelled"
        if outcome == "redirected":
            target = Backend.objects.select_related("device").get(pk=current.redirect_to_id)
            QueueTask.objects.filter(pk=task.pk).update(
                state=State.QUEUED, backend=target, device=target.device, queued_at=now, admitted_at=None,
                started_at=None, lease_until=None, generation=F("generation") + 1, redirects=F("redirects") + 1,
                redirect_to=None, cancel_requested=False)
        elif outcome == "succeeded":
            QueueTask.objects.filter(pk=task.pk).update(state=State.SUCCEEDED, result=result, finished_at=now,
                                                        lease_until=None, error_code="", redirect_to=None)
        elif outcome == "cancelled":
            QueueTask.objects.filter(pk=task.pk).update(state=State.CANCELLED, finished_at=now, lease_until=None,
                                                        error_code="cancelled", redirect_to=None)
        else:
            QueueTask.objects.filter(pk=task.pk).update(state=State.FAILED, finished_at=now, lease_until=None,
                                                        error_code=code[:64], error_message=message[:2000])
        LoadedModel.objects.filter(backend_id=task.backend_id, model=task.model).update(last_used_at=now)
        task = QueueTask.objects.select_related("project", "backend", "device", "api_key").get(pk=task.pk)
        event(task, outcome, actor="worker", at=now, ran_ms=_ms(current.started_at, now),
              detail={"attempt": current.attempts, "from": backend_name} if outcome == "redirected" else
              {"attempt": current.attempts, **({"error_code": code} if code else {})})
        trace.attempt(task, backend_name=backend_name, device_name=device_name, started_at=current.started_at or now,
                      now=now, outcome=outcome, message=message)
        if task.is_terminal:
            trace.finished(task, now=now)
        live.publish_task(task)
        inline = settings.SCHEDULER_DISPATCH_ON_FINISH and outcome != "redirected"
        if not inline:  # (a redirected task's new device may start it: the dispatcher's wake-up)
            transaction.on_commit(lambda: _wake(task.project_id))
    if inline:
        _dispatch_freed(device_id=current.device_id, project_id=task.project_id)
    return outcome


def _dispatch_freed(*, device_id: int, project_id: int) -> None:
    """What an ended attempt freed (memory, a backend's slot) is only on its own device: admit there now, in
    this worker, rather than after a round trip through the dispatcher's queue; on a failure, wake it."""
    from .dispatcher import dispatch_device

    try:
        dispatch_device(device_id)
    except Exception:  # noqa: BLE001 - the dispatcher's own wake-up (and its tick) admit it then
        logger.warning("dispatching device %s after a finish failed; waking the dispatcher", device_id,
                       exc_info=True)
        _wake(project_id)


def unload(loaded_pk: int) -> bool:
    """Free an evicted model (its row holds the memory until this is done)."""
    row = LoadedModel.objects.select_related("backend").filter(pk=loaded_pk, state=LoadedModel.State.UNLOADING).first()
    if row is None:
        return False
    try:
        client_for(row.backend).unload(row.model)
    except BackendError as exc:  # the memory stays held; the sweep asks again
        logger.warning("unloading %s failed: %s", row.model, exc)
        return False
    with transaction.atomic():
        done = LoadedModel.objects.filter(pk=loaded_pk, state=LoadedModel.State.UNLOADING).delete()[0]
        live.publish_queue([row.project_id])
        transaction.on_commit(lambda: _wake(row.project_id))
    return bool(done)


def sweep(*, now: datetime | None = None) -> dict:
    """What dead workers and lost messages left: running tasks whose lease ran out (retried under a new
    generation, or failed past their attempts; a stop asked of them is honoured), admitted tasks whose
    message went unclaimed too long (sent again, same generation: one claim wins), loads whose task will
    never run them (the row goes), unloads never done (asked again)."""
    from . import tasks
    from .dispatcher import device_queue

    now = now or timezone.now()
    out = {"retried": 0, "failed": 0, "resent": 0, "loads_dropped": 0, "unloads": 0}
    for task in QueueTask.objects.filter(state=State.RUNNING, lease_until__lt=now).select_related(
            "project", "backend", "device", "api_key")[:500]:
        generation = task.generation
        with transaction.atomic():
            locked = QueueTask.objects.select_for_update().filter(pk=task.pk, generation=generation,
                                                                  state=State.RUNNING, lease_until__lt=now).first()
            if locked is None:
                continue
        if locked.cancel_requested:
            finish(task, generation, outcome="stopped")
            continue
        if locked.attempts >= locked.max_attempts:
            finish(task, generation, outcome="failed", code="worker_lost",
                   message=f"The worker was lost {locked.attempts} times.")
            out["failed"] += 1
            continue
        with transaction.atomic():
            if QueueTask.objects.filter(pk=task.pk, generation=generation, state=State.RUNNING).update(
                    state=State.QUEUED, queued_at=now, admitted_at=None, started_at=None, lease_until=None,
                    generation=F("generation") + 1):
                task.refresh_from_db()
                event(task, "retried", at=now, detail={"attempt": locked.attempts, "reason": "worker_lost"})
                trace.attempt(task, backend_name=task.backend.name, device_name=task.device.name,
                              started_at=locked.started_at or now, now=now, outcome="retried", message="worker_lost")
                live.publish_task(task)
                out["retried"] += 1
    grace = now - timedelta(seconds=settings.SCHEDULER_CLAIM_GRACE_SECONDS)
    for pk, generation, gpu in QueueTask.objects.filter(state=State.ADMITTED).filter(
            Q(sent_at__lt=grace) | Q(sent_at__isnull=True, admitted_at__lt=grace)).values_list(
            "pk", "generation", "device__gpu")[:500]:
        if QueueTask.objects.filter(pk=pk, generation=generation, state=State.ADMITTED).update(sent_at=now):
            tasks.run.apply_async((pk, generation), queue=device_queue(gpu))
            out["resent"] += 1
    out["loads_dropped"] = LoadedModel.objects.filter(state=LoadedModel.State.LOADING).filter(
        Q(loading_task__isnull=True) | ~Q(loading_task__state__in=QueueTask.HOLDING)).delete()[0]
    for pk, gpu in LoadedModel.objects.filter(state=LoadedModel.State.UNLOADING, changed_at__lt=now - _lease()).values_list(
            "pk", "device__gpu")[:100]:
        LoadedModel.objects.filter(pk=pk).update(changed_at=now)
        tasks.unload.apply_async((pk,), queue=device_queue(gpu))
        out["unloads"] += 1
    return out
