"""Every write of the queue: devices and backends (project admins, audited), submissions (agents and
people), and operators' controls (pause, resume, throttle, cancel, redirect, reprioritise: people whose
role allows ``operate_project``, never a key; each audited with who and why, in its transaction).

A task's state changes by conditional updates only (``WHERE state = …``, and a worker's under its
generation): a cancel, a redirect and a worker's finish racing each other leave exactly one outcome.
The dispatcher is woken after each commit that may let something start (``tasks.wake``).
"""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Max, Q
from django.utils import timezone

from apps.audit.services import audit_record
from apps.common.errors import ApiError, ErrorCode
from apps.projects.models import ApiKey, Project
from apps.projects.services import actor_for, audit_change, update_audited
from apps.traces import records

from . import live, trace
from .dispatcher import held_mb
from .models import MAX_INPUT_BYTES, Backend, Control, Device, DispatchEvent, LoadedModel, QueueTask

State = QueueTask.State


def _wake(project_id: int) -> None:
    from .tasks import wake

    wake(project_id)


def _open_work(device_ids) -> bool:
    return QueueTask.objects.filter(device_id__in=device_ids, state__in=QueueTask.HOLDING).exists() or \
        LoadedModel.objects.filter(device_id__in=device_ids).exists()


# --- devices and backends (project admins) ----------------------------------------------------------


def _device_clean(device: Device, *, moving: bool) -> None:
    device.full_clean(exclude=["project"])
    if Device.objects.filter(project_id=device.project_id, name=device.name).exclude(pk=device.pk).exists():
        raise ValidationError({"name": "A device of this project has this name already."})
    if device.pk and moving and _open_work([device.pk]):
        raise ValidationError({"gpu": "Not while tasks run or models are loaded on it: pause it and let it drain."})
    if device.pk and held_mb(device.pk) > device.usable_mb:
        raise ValidationError({"memory_mb": f"Less than what its tasks and models hold now ({held_mb(device.pk)} "
                                            "MiB): pause it and let it drain first."})


@transaction.atomic
def device_create(*, project: Project, actor, **fields) -> Device:
    unknown = set(fields) - set(Device.FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of a device."})
    device = Device(project=project, **fields)
    _device_clean(device, moving=False)
    device.save()
    audit_change(actor, project, "scheduler.device_created", device, after=device.as_dict())
    return device


@transaction.atomic
def device_update(*, device: Device, actor, **changes) -> Device:
    device = Device.objects.select_for_update(of=("self",)).select_related("project").get(pk=device.pk)
    moving = "gpu" in changes and changes["gpu"] != device.gpu
    device = update_audited(device, changes, Device.FIELDS, lambda: _device_clean(device, moving=moving), actor,
                            "scheduler.device_updated")
    transaction.on_commit(lambda: _wake(device.project_id))
    return device


@transaction.atomic
def device_delete(*, device: Device, actor) -> None:
    if QueueTask.objects.filter(device=device).exists() or Backend.objects.filter(device=device).exists():
        raise ValidationError("A device with backends or tasks stays (disable it instead).")
    audit_change(actor, device.project, "scheduler.device_deleted", device, before=device.as_dict())
    device.delete()


def _backend_clean(backend: Backend, *, moving: bool) -> None:
    backend.full_clean(exclude=["project"])
    if Backend.objects.filter(project_id=backend.project_id, name=backend.name).exclude(pk=backend.pk).exists():
        raise ValidationError({"name": "A backend of this project has this name already."})
    if backend.pk and moving and (QueueTask.objects.filter(backend=backend, state__in=QueueTask.HOLDING).exists()
                                  or LoadedModel.objects.filter(backend=backend).exists()):
        raise ValidationError({"device": "Not while its tasks run or its models are loaded: pause it and let it "
                                         "drain."})


def _as_fields(fields: dict) -> dict:
    if isinstance(fields.get("device"), int):
        fields = {**fields, "device_id": fields.pop("device")}
    return fields


@transaction.atomic
def backend_create(*, project: Project, actor, **fields) -> Backend:
    unknown = set(fields) - set(Backend.FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of a backend."})
    backend = Backend(project=project, **_as_fields(fields))
    _backend_clean(backend, moving=False)
    backend.save()
    audit_change(actor, project, "scheduler.backend_created", backend, after=backend.as_dict())
    return backend


@transaction.atomic
def backend_update(*, backend: Backend, actor, **changes) -> Backend:
    backend = Backend.objects.select_for_update(of=("self",)).select_related("project", "device").get(
        pk=backend.pk)
    new_device = changes.get("device")
    moving = new_device is not None and getattr(new_device, "pk", new_device) != backend.device_id
    if isinstance(new_device, int):
        changes = {**changes, "device": Device.objects.get(pk=new_device)}
    backend = update_audited(backend, changes, Backend.FIELDS, lambda: _backend_clean(backend, moving=moving), actor,
                             "scheduler.backend_updated")
    transaction.on_commit(lambda: _wake(backend.project_id))
    return backend


@transaction.atomic
def backend_delete(*, backend: Backend, actor) -> None:
    if QueueTask.objects.filter(backend=backend).exists():
        raise ValidationError("A backend with tasks stays (disable it instead).")
    audit_change(actor, backend.project, "scheduler.backend_deleted", backend, before=backend.as_dict())
    backend.delete()


# --- submissions ----------------------------------------------------------------------------------


def _new_public_id() -> str:
    return "qt_" + secrets.token_hex(12)


def _who(key: ApiKey | None, user) -> str:
    if key is not None:
        return f"key {key.name}"
    return user.get_username() if user is not None else "system"


def pick_backend(project: Project, model: str, name: str = "", kind: str = "") -> Backend:
    """The backend a task for ``model`` goes to: the one named, or of the enabled backends serving the model
    (of ``kind``, when given) the one with the least open work (then by name)."""
    found = Backend.objects.filter(project=project, enabled=True).select_related("device")
    if kind:
        found = found.filter(kind=kind)
    if name:
        backend = found.filter(name=name).first()
        if backend is None:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"No enabled backend {name!r} in this project.",
                           details={"field": "backend"})
        if backend.need(model) is None:
            raise ApiError(ErrorCode.MODEL_NOT_SERVED, f"Backend {name!r} does not serve {model!r}.",
                           status_code=422, details={"field": "model", "backend": name})
        return backend
    serving = [b for b in found if b.need(model) is not None]
    if not serving:
        raise ApiError(ErrorCode.MODEL_NOT_SERVED, f"No enabled backend of this project serves {model!r}.",
                       status_code=422, details={"field": "model"})
    open_counts = dict(QueueTask.objects.filter(backend__in=serving, state__in=[State.QUEUED, *QueueTask.HOLDING])
                       .values("backend_id").annotate(n=Count("id")).values_list("backend_id", "n"))
    return min(serving, key=lambda b: (open_counts.get(b.pk, 0), b.name))


def _check_fits(backend: Backend, model: str, memory_mb: int) -> None:
    need = backend.need(model)
    total = memory_mb + int(need["load_mb"])
    if total > backend.device.usable_mb:
        raise ApiError(ErrorCode.EXCEEDS_DEVICE, f"{model!r} on {backend.name} needs {total} MiB with its load; "
                       f"device {backend.device.name} can give at most {backend.device.usable_mb} MiB.",
                       status_code=422, details={"field": "memory_mb", "needs_mb": total,
                                                 "usable_mb": backend.device.usable_mb})


@dataclass
class Submitted:
    task: QueueTask
    created: bool


def submit(*, project: Project, kind: str, model: str, key: ApiKey | None = None, user=None, backend: str = "",
           memory_mb: int | None = None, priority: int = 0, task_input: dict | None = None, run_id: str = "",
           span_id: str = "", end_user: str = "", max_attempts: int = 3,
           idempotency_key: str | None = None, backend_kind: str = "") -> Submitted:
    """Queue one task. Its memory is the backend's per-request need for the model unless more is asked;
    refused (422) where no backend serves the model or the task could not fit even on a drained device.
    An ``idempotency_key`` the key used already answers the task it created."""
    task_input = task_input if task_input is not None else {}
    problem = records.json_problem(task_input, limit=MAX_INPUT_BYTES)
    if problem:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"input: {problem}", details={"field": "input"})
    if kind not in QueueTask.Kind.values:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"kind: one of {', '.join(QueueTask.Kind.values)}.",
                       details={"field": "kind"})
    body_hash = hashlib.sha256(json.dumps(
        [kind, model, backend, memory_mb, priority, task_input, run_id, span_id, end_user, max_attempts],
        sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    if idempotency_key and key is not None:
        found = _idempotent(project, key, idempotency_key, body_hash)
        if found is not None:
            return Submitted(found, created=False)
    chosen = pick_backend(project, model, backend, backend_kind)
    need = chosen.need(model)
    memory = max(int(need["request_mb"]), int(memory_mb or 0))
    _check_fits(chosen, model, memory)
    now = timezone.now()
    task = QueueTask(project=project, public_id=_new_public_id(), kind=kind, api_key=key, user=user,
                     requested_by=_who(key, user), end_user=end_user, run_id=run_id, span_id=span_id,
                     backend=chosen, device=chosen.device, model=model, memory_mb=memory, priority=priority,
                     max_attempts=max_attempts, input=task_input, idempotency_key=idempotency_key or None,
                     request_hash=body_hash if idempotency_key else "", created_at=now, queued_at=now)
    try:
        with transaction.atomic():
            task.save()
            event(task, "submitted", actor=task.requested_by, detail={"priority": priority, "memory_mb": memory})
            live.publish_task(task)
            transaction.on_commit(lambda: _wake(project.pk))
    except IntegrityError:
        if not idempotency_key:
            raise
        found = _idempotent(project, key, idempotency_key, body_hash)  # a concurrent twin won the unique key
        if found is None:
            raise
        return Submitted(found, created=False)
    return Submitted(task, created=True)


def _idempotent(project: Project, key: ApiKey, idempotency_key: str, body_hash: str) -> QueueTask | None:
    found = QueueTask.objects.filter(project=project, api_key=key, idempotency_key=idempotency_key).first()
    if found is not None and found.request_hash != body_hash:
        raise ApiError(ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used with another request.",
                       status_code=409, details={"task_id": found.public_id})
    return found


def event(task: QueueTask, what: str, *, actor: str = "dispatcher", at=None, waited_ms: int | None = None,
          ran_ms: int | None = None, detail: dict | None = None) -> DispatchEvent:
    return DispatchEvent.objects.create(
        project_id=task.project_id, task=task, at=at or timezone.now(), event=what, actor=actor,
        device=task.device.name, backend=task.backend.name, generation=task.generation, waited_ms=waited_ms,
        ran_ms=ran_ms, detail=detail or {})


# --- operators ------------------------------------------------------------------------------------


def _audit(user, project: Project, action: str, obj, *, reason: str, after: dict, before: dict | None = None):
    audit_record(actor=actor_for(user, project), action=action, object_type=obj._meta.label_lower,
                 object_id=obj.pk, object_repr=str(obj), project_id=project.pk, project_slug=project.slug,
                 before=before, after={**after, "reason": reason})


def _locked(task: QueueTask) -> QueueTask:
    """The task's row locked (its own row only: the joined device row is the dispatcher's lock, taken first
    there; locking it here too deadlocked a redirect against an admission)."""
    return QueueTask.objects.select_related("project", "backend", "device").select_for_update(of=("self",)).get(
        pk=task.pk)


def _closed(task: QueueTask) -> ApiError:
    task.refresh_from_db()
    return ApiError(ErrorCode.TASK_CLOSED, f"The task is {task.state}.", status_code=409,
                    details={"state": task.state})


def cancel(*, task: QueueTask, user, reason: str = "", force: bool = False) -> QueueTask:
    """A queued or admitted task never starts; a running one is asked to stop (its worker ends it cancelled).
    ``force``: a running task is ended now and its worker process killed (an explicit, audited last resort)."""
    now = timezone.now()
    with transaction.atomic():
        task = _locked(task)
        before = {"state": task.state}
        if task.is_terminal:
            raise _closed(task)
        _stop(task, now=now, code="cancelled", reason=reason, at_once=task.state != State.RUNNING or force)
        event(task, "cancel_forced" if force and before["state"] == State.RUNNING else
              "cancel_requested" if task.state == State.RUNNING else "cancelled", actor=user.get_username(),
              detail={"reason": reason, "was": before["state"]})
        _audit(user, task.project, "scheduler.task_cancelled", task, reason=reason, before=before,
               after={"state": task.state, "force": force})
        live.publish_task(task)
        if force and before["state"] == State.RUNNING and task.worker_id:
            worker_id = task.worker_id
            transaction.on_commit(lambda: _terminate(worker_id), robust=True)
        transaction.on_commit(lambda: _wake(task.project_id))
    return task


def withdraw(*, task_pk: int, actor: str, reason: str) -> str:
    """The submitter takes its task back (the gateway, when its caller went away or waited too long): a task
    not started never starts, a running one is asked to stop. Not an operator's act, so not audited; the
    dispatch history names who. Answers the task's state after (a task that ended already is left so)."""
    now = timezone.now()
    with transaction.atomic():
        task = QueueTask.objects.select_related("project", "backend", "device").select_for_update(
            of=("self",)).filter(pk=task_pk).first()
        if task is None or task.is_terminal:
            return task.state if task else ""
        was = task.state
        _stop(task, now=now, code="withdrawn", reason=reason, at_once=was != State.RUNNING)
        event(task, "withdrawn" if task.state == State.CANCELLED else "withdraw_requested", actor=actor,
              detail={"reason": reason, "was": was})
        live.publish_task(task)
        transaction.on_commit(lambda: _wake(task.project_id))
    return task.state


def _stop(task: QueueTask, *, now, code: str, reason: str, at_once: bool) -> None:
    """End the (locked, open) task now (``at_once``: a queued or admitted one, or a running one forced; its
    generation bumped, so no message or worker of it claims or finishes anything), or ask its worker to
    stop it."""
    if at_once:
        _drop_unstarted_load(task)
        QueueTask.objects.filter(pk=task.pk).update(
            state=State.CANCELLED, finished_at=now, generation=F("generation") + 1, lease_until=None,
            error_code=code, error_message=reason[:2000], cancel_requested=True, redirect_to=None)
        task.refresh_from_db()
        trace.finished(task, now=now)
    else:
        QueueTask.objects.filter(pk=task.pk).update(cancel_requested=True, redirect_to=None,
                                                    error_message=reason[:2000])
        task.refresh_from_db()


def _drop_unstarted_load(task: QueueTask) -> None:
    """An admitted task that asked for its model's load and never started takes the load back (its row
    held memory nothing will use). A started one's load may be in memory: the sweep decides."""
    if task.state == State.ADMITTED:
        LoadedModel.objects.filter(loading_task=task, state=LoadedModel.State.LOADING).delete()


def _terminate(celery_id: str) -> None:
    """Kill the worker process running ``celery_id`` (Celery's revoke with terminate: the pool child gets
    SIGKILL). Its task is already cancelled under a new generation, so nothing it might still write lands."""
    from celery import current_app

    current_app.control.revoke(celery_id, terminate=True, signal="SIGKILL")


def redirect(*, task: QueueTask, backend: Backend, user, reason: str = "") -> QueueTask:
    """Move a task to ``backend`` (of the same project, serving its model). A queued or admitted one moves
    now (back to the queue there); a running one is asked to stop, and its worker puts it back in the queue
    on the new backend once it has stopped (its work is done once: by the old backend if it finished
    first, else by the new one)."""
    if backend.project_id != task.project_id:
        raise ApiError(ErrorCode.INVALID_REQUEST, "A backend of the task's project.", details={"field": "backend"})
    if not backend.enabled or backend.need(task.model) is None:
        raise ApiError(ErrorCode.MODEL_NOT_SERVED, f"Backend {backend.name!r} does not serve {task.model!r}.",
                       status_code=422, details={"field": "backend"})
    now = timezone.now()
    with transaction.atomic():
        task = _locked(task)
        backend = Backend.objects.select_related("device").get(pk=backend.pk)
        if backend.pk == task.backend_id:
            raise ApiError(ErrorCode.INVALID_REQUEST, "The task is on this backend already.",
                           details={"field": "backend"})
        memory = max(task.memory_mb, int(backend.need(task.model)["request_mb"]))
        _check_fits(backend, task.model, memory)
        before = {"state": task.state, "backend": task.backend.name}
        if task.state in (State.QUEUED, State.ADMITTED):
            _drop_unstarted_load(task)
            QueueTask.objects.filter(pk=task.pk).update(
                state=State.QUEUED, backend=backend, device=backend.device, memory_mb=memory, queued_at=now,
                admitted_at=None, generation=F("generation") + 1, redirects=F("redirects") + 1)
        elif task.state == State.RUNNING:
            QueueTask.objects.filter(pk=task.pk).update(redirect_to=backend, cancel_requested=True)
        else:
            raise _closed(task)
        task.refresh_from_db()
        event(task, "redirected" if task.state == State.QUEUED else "redirect_requested", actor=user.get_username(),
              detail={"reason": reason, "from": before["backend"], "to": backend.name, "was": before["state"]})
        _audit(user, task.project, "scheduler.task_redirected", task, reason=reason, before=before,
               after={"state": task.state, "backend": backend.name})
        live.publish_task(task)
        transaction.on_commit(lambda: _wake(task.project_id))
    return task


@transaction.atomic
def reprioritise(*, task: QueueTask, priority: int, user, reason: str = "") -> QueueTask:
    if not -100 <= priority <= 100:
        raise ApiError(ErrorCode.INVALID_REQUEST, "priority: -100 to 100.", details={"field": "priority"})
    task = _locked(task)
    before = {"priority": task.priority}
    if not QueueTask.objects.filter(pk=task.pk, state=State.QUEUED).update(priority=priority):
        raise _closed(task)
    task.priority = priority
    event(task, "reprioritised", actor=user.get_username(), detail={"reason": reason, **before, "to": priority})
    _audit(user, task.project, "scheduler.task_reprioritised", task, reason=reason, before=before,
           after={"priority": priority})
    live.publish_task(task)
    transaction.on_commit(lambda: _wake(task.project_id))
    return task


def _last_start_known(*, device: Device | None, backend: Backend | None) -> None:
    """The dispatcher keeps a device's or backend's last start only while a throttle reads it: one being set
    starts from the latest admission there (under the device's row lock, as the dispatcher writes it)."""
    device_id = device.pk if device is not None else backend.device_id
    Device.objects.select_for_update().filter(pk=device_id).first()
    tasks = QueueTask.objects.filter(device_id=device_id) if device is not None else \
        QueueTask.objects.filter(backend_id=backend.pk)
    latest = tasks.aggregate(at=Max("admitted_at"))["at"]
    (Device.objects.filter(pk=device_id) if device is not None else Backend.objects.filter(pk=backend.pk)).update(
        last_start_at=latest)


@transaction.atomic
def control_set(*, project: Project, user, device: Device | None = None, backend: Backend | None = None,
                paused: bool | None = None, throttle_ms: int | None = None, reason: str = "") -> Control:
    """Pause, resume or throttle a project's whole queue (no device, no backend), a device or a backend."""
    if device is not None and backend is not None:
        raise ApiError(ErrorCode.INVALID_REQUEST, "A device or a backend, not both.")
    for row in (device, backend):
        if row is not None and row.project_id != project.pk:
            raise ApiError(ErrorCode.NOT_FOUND, "Not found.", status_code=404)
    if throttle_ms is not None and (device is None and backend is None):
        raise ApiError(ErrorCode.INVALID_REQUEST, "A throttle is set on a device or a backend.",
                       details={"field": "throttle_ms"})
    if throttle_ms is not None and not 0 <= throttle_ms <= 3_600_000:
        raise ApiError(ErrorCode.INVALID_REQUEST, "throttle_ms: 0 to 3,600,000.", details={"field": "throttle_ms"})
    target = Q(device=device) if device is not None else Q(backend=backend) if backend is not None else \
        Q(device__isnull=True, backend__isnull=True)
    now = timezone.now()
    control = Control.objects.select_for_update().filter(target, project=project).first()
    if control is None:
        control = Control.objects.create(project=project, device=device, backend=backend, updated_at=now)
    before = {"paused": control.paused, "throttle_ms": control.throttle_ms}
    if paused is not None:
        control.paused = paused
    if throttle_ms is not None:
        if throttle_ms and not control.throttle_ms:
            _last_start_known(device=device, backend=backend)
        control.throttle_ms = throttle_ms
    control.reason, control.updated_by, control.updated_at = reason[:500], user.get_username(), now
    control.save()
    _audit(user, project, "scheduler.control_set", control, reason=reason, before=before,
           after={"paused": control.paused, "throttle_ms": control.throttle_ms,
                  "target": "device " + device.name if device else "backend " + backend.name if backend else "queue"})
    live.publish_queue([project.pk])
    transaction.on_commit(lambda: _wake(project.pk))
    return control
