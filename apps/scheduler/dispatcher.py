"""The dispatcher: admits what fits, one device at a time, in one transaction per device.

``dispatch_device`` locks the device's row (``SELECT … FOR UPDATE``; SQLite's writers are serialised by
its IMMEDIATE transactions), reads the controls, the ledger (admitted and running tasks, loaded models),
the last fresh reading and the waiting tasks, asks ``admission.plan`` and applies it: each admission is a
conditional update (``WHERE state = 'queued'``) that bumps the task's generation, a load is a
``LoadedModel`` row in ``loading``, an eviction turns a loaded row to ``unloading``. Before it commits,
the ledger is summed again and the transaction is undone if it would exceed the device's usable memory
(a guard against any bug in the plan: never a crashed driver). Messages to the workers (task ids and
generations only, on the device's own queue) are sent after the commit.

``tick`` is the beat's: sample the GPUs, recover what a dead worker left (``executor.sweep``), and
dispatch every device with waiting work.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from . import admission, gpus, live
from .models import Backend, Control, Device, DispatchEvent, GpuReading, LoadedModel, QueueTask

logger = logging.getLogger(__name__)

State = QueueTask.State


class LedgerOverflow(Exception):
    """The plan would have held more than the device's usable memory: nothing was admitted."""


def device_queue(gpu: str) -> str:
    """The Celery queue of one GPU's work (a GPU host's worker consumes its own GPUs' queues)."""
    return "gpu." + gpu.replace(":", ".")


def held_mb(device_id: int) -> int:
    """The ledger: what admitted and running tasks and loaded (loading, unloading) models hold. One
    statement, written out: it runs in every admission after the decision, where the ORM's compiling
    cost more than the query."""
    tasks, models = QueueTask._meta.db_table, LoadedModel._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT COALESCE(SUM(memory_mb), 0) FROM {tasks} WHERE device_id = %s AND state IN (%s, %s))"
            f" + (SELECT COALESCE(SUM(memory_mb), 0) FROM {models} WHERE device_id = %s)",
            [device_id, *QueueTask.HOLDING, device_id])
        return int(cursor.fetchone()[0])


def _admit(task_id: int, generation: int, at: datetime) -> bool:
    """``queued → admitted`` if the task is still queued under the generation read (written out, as
    ``held_mb``)."""
    at_value = connection.ops.adapt_datetimefield_value(at)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {QueueTask._meta.db_table} SET state = %s, admitted_at = %s, sent_at = %s, "
            "generation = generation + 1 WHERE id = %s AND state = %s AND generation = %s",
            [State.ADMITTED, at_value, at_value, task_id, State.QUEUED, generation])
        return cursor.rowcount == 1


def live_free_mb(device: Device, now: datetime) -> int | None:
    """NVML's free memory less the device's margin, from a reading fresh enough; None: no reading."""
    reading = GpuReading.objects.filter(
        gpu=device.gpu, read_at__gte=now - timedelta(seconds=settings.SCHEDULER_READING_MAX_AGE_SECONDS)).first()
    if reading is None or reading.free_mb is None:
        return None
    return reading.free_mb - device.live_margin_mb


def _controls(device: Device) -> dict:
    rows = Control.objects.filter(project_id=device.project_id).filter(
        Q(device=device) | Q(backend__device=device) | Q(device__isnull=True, backend__isnull=True))
    out = {"queue": None, "device": None, "backends": {}}
    for c in rows:
        if c.backend_id:
            out["backends"][c.backend_id] = c
        elif c.device_id:
            out["device"] = c
        else:
            out["queue"] = c
    return out


def _view(device: Device, now: datetime) -> tuple[admission.DeviceView, dict[int, admission.BackendView],
                                                  list[admission.Waiting], dict[int, dict]]:
    controls = _controls(device)
    busy = {(r["backend_id"], r["model"]): r for r in QueueTask.objects.filter(
        device=device, state__in=QueueTask.HOLDING).values("backend_id", "model").annotate(n=Count("id"),
                                                                                           m=Sum("memory_mb"))}
    active: dict[int, int] = {}
    for (backend_id, _model), r in busy.items():
        active[backend_id] = active.get(backend_id, 0) + r["n"]
    backends = {}
    for b in Backend.objects.filter(device=device, enabled=True):
        c = controls["backends"].get(b.pk)
        backends[b.pk] = admission.BackendView(
            id=b.pk, name=b.name, model_memory=b.model_memory if isinstance(b.model_memory, dict) else {},
            concurrency=b.concurrency, active=active.get(b.pk, 0), paused=bool(c and c.paused),
            throttle_ms=c.throttle_ms if c else 0, last_start_at=b.last_start_at)
    loaded = {(m.backend_id, m.model): admission.Loaded(m.backend_id, m.model, m.memory_mb, m.state, m.last_used_at,
                                                        busy=(m.backend_id, m.model) in busy)
              for m in LoadedModel.objects.filter(device=device)}
    queue, dev = controls["queue"], controls["device"]
    view = admission.DeviceView(
        usable_mb=device.usable_mb, held_tasks_mb=sum(r["m"] or 0 for r in busy.values()), loaded=loaded,
        live_free_mb=live_free_mb(device, now), paused=bool((queue and queue.paused) or (dev and dev.paused)),
        throttle_ms=dev.throttle_ms if dev else 0, last_start_at=device.last_start_at)
    # Only tasks of backends that may start one now can be admitted (the plan passes over the others and
    # they hold nothing back): a paused or throttled device, or every backend full, reads no waiting row.
    open_backends = [b.id for b in backends.values() if not b.paused and b.active < b.concurrency and not (
        b.throttle_ms and admission.elapsed_ms(now, b.last_start_at) < b.throttle_ms)]
    rows = []
    if open_backends and not view.paused and not (
            view.throttle_ms and admission.elapsed_ms(now, view.last_start_at) < view.throttle_ms):
        rows = list(QueueTask.objects.filter(device=device, state=State.QUEUED, backend_id__in=open_backends).order_by(
            "-priority", "queued_at", "id").values("id", "public_id", "generation", "backend_id", "model", "memory_mb",
                                                   "priority", "queued_at")[:settings.SCHEDULER_SCAN_LIMIT])
    waiting = [admission.Waiting(id=t["id"], backend_id=t["backend_id"], model=t["model"], memory_mb=t["memory_mb"],
                                 priority=t["priority"], queued_at=t["queued_at"]) for t in rows]
    return view, backends, waiting, {t["id"]: t for t in rows}


def dispatch_device(device_id: int, *, now: datetime | None = None) -> list[int]:
    """Admit what fits on one device now; the ids of the tasks admitted."""
    from . import tasks  # the Celery tasks import this module

    now, began = now or timezone.now(), time.perf_counter()
    sends: list[tuple[int, int]] = []
    unloads: list[int] = []
    with transaction.atomic():
        device = Device.objects.select_for_update().filter(pk=device_id, enabled=True).first()
        if device is None:
            return []
        view, backends, waiting, rows = _view(device, now)
        if not waiting:
            return []
        plan = admission.plan(view, backends, waiting, now, aging_seconds=settings.SCHEDULER_AGING_SECONDS,
                              starvation_seconds=settings.SCHEDULER_STARVATION_SECONDS)
        # The admission's moment is its decision's: ``now`` (as of which the plan read the device) and the
        # time the reads and the plan took. From here to the workers' messages: as few statements as hold.
        decided = now + timedelta(seconds=time.perf_counter() - began)
        admitted: list[dict] = []
        for task_id, load in plan.admit:
            t = rows[task_id]
            # Conditional on the generation read: a task changed since (redirected, cancelled, reprioritised)
            # is left to the next dispatch; the admitted one's generation is then exactly the next.
            if not _admit(task_id, t["generation"], decided):
                continue
            if load is not None:
                LoadedModel.objects.create(project_id=device.project_id, device=device, backend_id=t["backend_id"],
                                           model=t["model"], memory_mb=load, state=LoadedModel.State.LOADING,
                                           loading_task_id=task_id, last_used_at=decided, changed_at=decided)
            admitted.append({**t, "load_mb": load})
            sends.append((task_id, t["generation"] + 1))
        for backend_id, model in plan.evict:
            row = LoadedModel.objects.filter(backend_id=backend_id, model=model, state=LoadedModel.State.LOADED).first()
            if row is not None and LoadedModel.objects.filter(pk=row.pk, state=LoadedModel.State.LOADED).update(
                    state=LoadedModel.State.UNLOADING, changed_at=now):
                unloads.append(row.pk)
        queue = device_queue(device.gpu)

        def send() -> None:
            for pk, generation in sends:
                tasks.run.apply_async((pk, generation), queue=queue)
            for pk in unloads:
                tasks.unload.apply_async((pk,), queue=queue)

        # Registered first, so that the workers' messages leave before the live side is told.
        transaction.on_commit(send)
        if admitted:
            held = held_mb(device.pk)
            if held > device.usable_mb:
                raise LedgerOverflow(f"device {device.pk}: {held} MiB held of {device.usable_mb}")
            # The throttle compares plans' clocks (the next plan's ``now`` against this one's); a last start
            # is kept only where a throttle reads it (``services.control_set`` sets it when one is set).
            if view.throttle_ms:
                Device.objects.filter(pk=device.pk).update(last_start_at=now)
            throttled = {t["backend_id"] for t in admitted if backends[t["backend_id"]].throttle_ms}
            if throttled:
                Backend.objects.filter(pk__in=throttled).update(last_start_at=now)
            DispatchEvent.objects.bulk_create([DispatchEvent(
                project_id=device.project_id, task_id=t["id"], at=decided, event="admitted", actor="dispatcher",
                device=device.name, backend=backends[t["backend_id"]].name, generation=t["generation"] + 1,
                waited_ms=max(0, int((decided - t["queued_at"]).total_seconds() * 1000)),
                detail={"memory_mb": t["memory_mb"], "load_mb": t["load_mb"]}) for t in admitted])
            live.publish_tasks(device.project_id, [(t["id"], t["public_id"]) for t in admitted], State.ADMITTED)
        if admitted or unloads:
            live.publish_queue([device.project_id])
    return [pk for pk, _ in sends]


def dispatch(*, project_id: int | None = None, now: datetime | None = None) -> int:
    """Dispatch every device with waiting work; how many tasks were admitted."""
    devices = Device.objects.filter(enabled=True, tasks__state=State.QUEUED).distinct()
    if project_id is not None:
        devices = devices.filter(project_id=project_id)
    return sum(len(dispatch_device(pk, now=now)) for pk in devices.values_list("pk", flat=True))


def tick() -> int:
    """The beat's tick: sample the GPUs, recover what dead workers left, dispatch."""
    from . import executor

    try:
        gpus.sample()
    except Exception:  # a failed reading leaves the last one to age out: the ledger then decides alone
        logger.exception("reading the GPUs failed")
    executor.sweep()
    return dispatch()
