"""Every read of the queue, given the principal and scoped through ``visible_to`` (the one authorization
path). ``task_json`` is the one shape of a task (the API, the long-poll, the agents' socket);
``queue_state`` the one picture of a project's queue (the API, the live page, the overview's tile)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Min, Q, Sum
from django.http import Http404
from django.utils import timezone

from .models import Backend, Control, Device, DispatchEvent, GpuReading, LoadedModel, QueueTask

State = QueueTask.State


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def position(task: QueueTask) -> int | None:
    """Where a queued task stands on its device: 1 is next (by priority, then age); None once it left."""
    if task.state != State.QUEUED:
        return None
    ahead = QueueTask.objects.filter(device_id=task.device_id, state=State.QUEUED).filter(
        Q(priority__gt=task.priority) | Q(priority=task.priority, queued_at__lt=task.queued_at)
        | Q(priority=task.priority, queued_at=task.queued_at, pk__lt=task.pk)).count()
    return ahead + 1


def task_json(task: QueueTask, history: list[DispatchEvent] | None = None, *, with_position: bool = True) -> dict:
    out = {
        "id": task.public_id, "project": task.project.slug, "kind": task.kind, "state": task.state,
        "model": task.model, "backend": task.backend.name, "device": task.device.name,
        "memory_mb": task.memory_mb, "priority": task.priority, "attempts": task.attempts,
        "max_attempts": task.max_attempts, "redirects": task.redirects, "requested_by": task.requested_by,
        "end_user": task.end_user, "run_id": task.run_id, "span_id": task.span_id,
        "stop_requested": task.cancel_requested and task.state == State.RUNNING,
        "position": position(task) if with_position else None,
        "created_at": _iso(task.created_at), "queued_at": _iso(task.queued_at), "admitted_at": _iso(task.admitted_at),
        "started_at": _iso(task.started_at), "finished_at": _iso(task.finished_at),
        "result": task.result, "error_code": task.error_code or None, "error_message": task.error_message or None,
    }
    if history is not None:
        out["history"] = [{"at": _iso(e.at), "event": e.event, "actor": e.actor, "device": e.device,
                           "backend": e.backend, "generation": e.generation, "waited_ms": e.waited_ms,
                           "ran_ms": e.ran_ms, "detail": e.detail} for e in history]
    return out


def local_models(project_id: int) -> set[str]:
    """The models the project's enabled OpenAI-compatible backends serve (on enabled devices): what the
    gateway sends through the queue rather than to an upstream (as ``services.pick_backend`` chooses)."""
    found: set[str] = set()
    for memory in Backend.objects.filter(project_id=project_id, enabled=True, kind=Backend.Kind.OPENAI).values_list("model_memory", flat=True):
        if isinstance(memory, dict):
            found.update(memory)
    return found


@dataclass(frozen=True)
class Outcome:
    """Where a task stands, as one who waits on it reads it (no model instance crosses into async code)."""

    state: str
    ended: bool
    backend: str
    device: str
    attempts: int
    redirects: int
    result: dict | list | None
    error_code: str
    error_message: str
    started_at: datetime | None
    finished_at: datetime | None


def outcome(task_pk: int) -> Outcome:
    t = QueueTask.objects.select_related("backend", "device").get(pk=task_pk)
    return Outcome(state=t.state, ended=t.is_terminal, backend=t.backend.name, device=t.device.name,
                   attempts=t.attempts, redirects=t.redirects, result=t.result, error_code=t.error_code,
                   error_message=t.error_message, started_at=t.started_at, finished_at=t.finished_at)


def task(*, principal, task_id: str) -> QueueTask:
    found = QueueTask.objects.visible_to(principal).select_related("project", "backend", "device").filter(
        public_id=task_id).first()
    if found is None:
        raise Http404
    return found


def history_of(task_: QueueTask) -> list[DispatchEvent]:
    return list(task_.history.order_by("at", "id"))


def tasks(*, principal, project_slug: str | None = None, state: str | None = None, backend: str | None = None,
          before: int | None = None, limit: int = 50) -> list[QueueTask]:
    """The tasks the principal may see, newest first (keyset on the row id: ``before``)."""
    qs = QueueTask.objects.visible_to(principal, project_slug=project_slug).select_related("project", "backend",
                                                                                            "device")
    if state:
        qs = qs.filter(state=state)
    if backend:
        qs = qs.filter(backend__name=backend)
    if before:
        qs = qs.filter(pk__lt=before)
    return list(qs.order_by("-pk")[:limit])


def open_tasks(*, project, limit: int = 200) -> list[QueueTask]:
    """The live page's rows: running and admitted first, then queued by priority and age."""
    qs = QueueTask.objects.filter(project=project, state__in=[State.QUEUED, *QueueTask.HOLDING]).select_related(
        "project", "backend", "device")
    running = list(qs.filter(state__in=QueueTask.HOLDING).order_by("admitted_at", "pk")[:limit])
    queued = list(qs.filter(state=State.QUEUED).order_by("-priority", "queued_at", "pk")[:max(0, limit - len(running))])
    return running + queued


# --- the queue's picture --------------------------------------------------------------------------


@dataclass
class DeviceState:
    device: Device
    usable_mb: int
    held_tasks_mb: int
    held_models_mb: int
    reading: GpuReading | None
    live_fresh: bool
    paused: bool
    throttle_ms: int
    control: Control | None
    models: list[LoadedModel] = field(default_factory=list)

    @property
    def held_mb(self) -> int:
        return self.held_tasks_mb + self.held_models_mb

    @property
    def ledger_free_mb(self) -> int:
        return max(0, self.usable_mb - self.held_mb)

    @property
    def live_free_mb(self) -> int | None:
        if not self.live_fresh or self.reading is None or self.reading.free_mb is None:
            return None
        return max(0, self.reading.free_mb - self.device.live_margin_mb)

    @property
    def free_mb(self) -> int:
        """What admission can give now: the smaller of the ledger and the live reading."""
        live = self.live_free_mb
        return self.ledger_free_mb if live is None else min(self.ledger_free_mb, live)

    @property
    def held_pct(self) -> int:
        return min(100, round(100 * self.held_mb / self.usable_mb)) if self.usable_mb else 0

    def as_json(self) -> dict:
        r = self.reading
        return {"name": self.device.name, "gpu": self.device.gpu, "enabled": self.device.enabled,
                "memory_mb": self.device.memory_mb, "headroom_mb": self.device.headroom_mb,
                "usable_mb": self.usable_mb, "held_mb": self.held_mb, "held_by_tasks_mb": self.held_tasks_mb,
                "held_by_models_mb": self.held_models_mb, "free_mb": self.free_mb,
                "ledger_free_mb": self.ledger_free_mb, "live_free_mb": self.live_free_mb,
                "reading": None if r is None else {"source": r.source, "total_mb": r.total_mb, "used_mb": r.used_mb,
                                                   "free_mb": r.free_mb, "utilization": r.utilization,
                                                   "read_at": _iso(r.read_at), "fresh": self.live_fresh},
                "paused": self.paused, "throttle_ms": self.throttle_ms,
                "models": [{"backend": m.backend.name, "model": m.model, "state": m.state, "memory_mb": m.memory_mb,
                            "last_used_at": _iso(m.last_used_at)} for m in self.models]}


@dataclass
class BackendState:
    backend: Backend
    queued: int
    admitted: int
    running: int
    draining: int  # running while its backend or device is paused
    paused: bool
    throttle_ms: int

    def as_json(self) -> dict:
        b = self.backend
        return {"name": b.name, "device": b.device.name, "kind": b.kind, "enabled": b.enabled,
                "concurrency": b.concurrency, "models": sorted(b.model_memory) if isinstance(b.model_memory, dict)
                else [], "queued": self.queued, "admitted": self.admitted, "running": self.running,
                "draining": self.draining, "paused": self.paused, "throttle_ms": self.throttle_ms}


@dataclass
class QueueState:
    project_id: int
    paused: bool
    control: Control | None
    devices: list[DeviceState]
    backends: list[BackendState]
    depth: int
    oldest_wait_seconds: float | None
    wait_p50_ms: int | None
    wait_p95_ms: int | None
    admitted_recently: int

    def as_json(self) -> dict:
        return {"paused": self.paused, "reason": self.control.reason if self.control else "",
                "depth": self.depth, "oldest_wait_seconds": self.oldest_wait_seconds,
                "wait_p50_ms": self.wait_p50_ms, "wait_p95_ms": self.wait_p95_ms,
                "admitted_last_15_min": self.admitted_recently,
                "devices": [d.as_json() for d in self.devices], "backends": [b.as_json() for b in self.backends]}


def _quantile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def queue_state(*, project, now: datetime | None = None) -> QueueState:
    """A project's queue now: per device what is held (tasks, models), free (ledger, live) and its controls;
    per backend what is queued, admitted, running and draining; the depth and the waits (the oldest waiting
    task's age, and p50 / p95 of the waits of the tasks admitted in the last 15 minutes)."""
    now = now or timezone.now()
    controls = list(Control.objects.filter(project=project))
    queue_control = next((c for c in controls if not c.device_id and not c.backend_id), None)
    by_device = {c.device_id: c for c in controls if c.device_id}
    by_backend = {c.backend_id: c for c in controls if c.backend_id}
    devices = list(Device.objects.filter(project=project).order_by("name"))
    readings = {r.gpu: r for r in GpuReading.objects.filter(gpu__in=[d.gpu for d in devices])}
    fresh_after = now - timedelta(seconds=settings.SCHEDULER_READING_MAX_AGE_SECONDS)
    held = {r["device_id"]: r["m"] or 0 for r in QueueTask.objects.filter(
        project=project, state__in=QueueTask.HOLDING).values("device_id").annotate(m=Sum("memory_mb"))}
    models: dict[int, list[LoadedModel]] = {}
    for m in LoadedModel.objects.filter(project=project).select_related("backend").order_by("-last_used_at"):
        models.setdefault(m.device_id, []).append(m)
    queue_paused = bool(queue_control and queue_control.paused)
    device_states = []
    for d in devices:
        c, r = by_device.get(d.pk), readings.get(d.gpu)
        device_states.append(DeviceState(
            device=d, usable_mb=d.usable_mb, held_tasks_mb=held.get(d.pk, 0),
            held_models_mb=sum(m.memory_mb for m in models.get(d.pk, [])), reading=r,
            live_fresh=r is not None and r.read_at >= fresh_after, paused=queue_paused or bool(c and c.paused),
            throttle_ms=c.throttle_ms if c else 0, control=c, models=models.get(d.pk, [])))
    paused_devices = {s.device.pk for s in device_states if s.paused}
    counts: dict[int, dict[str, int]] = {}
    for r in QueueTask.objects.filter(project=project, state__in=[State.QUEUED, *QueueTask.HOLDING]).values(
            "backend_id", "state").annotate(n=Count("id")):
        counts.setdefault(r["backend_id"], {})[r["state"]] = r["n"]
    backend_states = []
    for b in Backend.objects.filter(project=project).select_related("device").order_by("name"):
        c, n = by_backend.get(b.pk), counts.get(b.pk, {})
        paused = bool(c and c.paused) or b.device_id in paused_devices
        running = n.get(State.RUNNING, 0)
        backend_states.append(BackendState(backend=b, queued=n.get(State.QUEUED, 0), admitted=n.get(State.ADMITTED, 0),
                                           running=running, draining=running if paused else 0, paused=paused,
                                           throttle_ms=c.throttle_ms if c else 0))
    waiting = QueueTask.objects.filter(project=project, state=State.QUEUED).aggregate(n=Count("id"),
                                                                                      oldest=Min("queued_at"))
    waits = list(DispatchEvent.objects.filter(project=project, event="admitted", at__gte=now - timedelta(minutes=15))
                 .order_by("-at").values_list("waited_ms", flat=True)[:2000])
    waits = [w for w in waits if w is not None]
    return QueueState(
        project_id=project.pk, paused=queue_paused, control=queue_control, devices=device_states,
        backends=backend_states, depth=waiting["n"],
        oldest_wait_seconds=None if waiting["oldest"] is None else round((now - waiting["oldest"]).total_seconds(), 1),
        wait_p50_ms=_quantile(waits, 0.5), wait_p95_ms=_quantile(waits, 0.95), admitted_recently=len(waits))


def queue_summary(*, principal, project_slug: str | None = None, now: datetime | None = None) -> dict:
    """The overview's tile: across the projects the principal may see, the depth, the oldest waiting task's
    age, what runs, and the paused devices (by name, with their project) and whether a whole queue is."""
    now = now or timezone.now()
    tasks_qs = QueueTask.objects.visible_to(principal, project_slug=project_slug)
    waiting = tasks_qs.filter(state=State.QUEUED).aggregate(n=Count("id"), oldest=Min("queued_at"))
    running = tasks_qs.filter(state__in=QueueTask.HOLDING).count()
    controls = Control.objects.visible_to(principal, project_slug=project_slug).filter(paused=True).select_related(
        "project", "device", "backend")
    paused = [{"project": c.project.slug, "target": c.device.name if c.device_id else
               c.backend.name if c.backend_id else "the whole queue",
               "kind": "device" if c.device_id else "backend" if c.backend_id else "queue", "reason": c.reason}
              for c in controls]
    devices = Device.objects.visible_to(principal, project_slug=project_slug).count()
    return {"depth": waiting["n"], "running": running, "devices": devices, "paused": paused,
            "oldest_wait_seconds": None if waiting["oldest"] is None else (now - waiting["oldest"]).total_seconds()}


def recent_tasks(*, project, limit: int = 20) -> list[QueueTask]:
    """The project's ended tasks, newest first (by the (project, state, created) index)."""
    return list(QueueTask.objects.filter(project=project, state__in=QueueTask.TERMINAL).select_related(
        "project", "backend", "device").order_by("-created_at", "-id")[:limit])
