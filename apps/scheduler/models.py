"""The GPU-aware queue of record.

A ``Device`` is one GPU a project's work runs on: its capacity in MiB (what the scheduler may hand out),
the headroom it never hands out, and the GPU it is (``gpu``: the key of a reading, ``nvml:<uuid>`` or
``declared:<name>``; one GPU is one device). A ``Backend`` is a model server bound to a device: an
OpenAI-compatible URL or a registered task handler, the memory each of its models needs when loaded and
per request, and how many tasks it runs at once. ``LoadedModel`` rows are the models a backend holds in
memory (loading, loaded, unloading: each holds its memory until the unload is done).

A ``QueueTask`` is one piece of work: ``queued → admitted → running → succeeded | failed | cancelled``.
Admitted and running tasks hold their request's memory on their device (the ledger). Every change of a
task's state is a conditional update; a worker claims a task under its ``generation``, so a message
for an older generation (redelivered, or sent before a cancel or a redirect) finds nothing to claim.
``DispatchEvent`` rows are each task's history (who, where, when, how long it waited and ran).

``Control`` rows are what operators set: pause and throttle of a project's whole queue, a device or a
backend; the dispatcher reads them inside its admission transaction. ``GpuReading`` rows are the last
live reading of each GPU (NVML), by its key: the hardware, not a project's.
"""
from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from apps.projects.models import ProjectOwnedQuerySet

MAX_INPUT_BYTES = 256 * 1024
MAX_MODELS = 100
GPU_KEY_RE = re.compile(r"^(nvml|declared):[A-Za-z0-9._:/-]{1,190}$")
MODEL_NAME_RE = re.compile(r"^[^\s]{1,200}$")


class GpuReading(models.Model):
    """The last live reading of one GPU (``gpus.read_all``): the hardware's own figures, shared by the
    projects whose devices name it. A declared GPU (no NVML) has a total and no live figures."""

    gpu = models.CharField(max_length=200, unique=True)
    name = models.CharField(max_length=200, blank=True)
    source = models.CharField(max_length=16)  # nvml | declared
    total_mb = models.PositiveIntegerField()
    used_mb = models.PositiveIntegerField(null=True, blank=True)
    free_mb = models.PositiveIntegerField(null=True, blank=True)
    utilization = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Percent, over NVML's sample.")
    read_at = models.DateTimeField()

    class Meta:
        ordering = ["gpu"]

    def __str__(self) -> str:
        return self.gpu


class Device(models.Model):
    FIELDS = ("name", "gpu", "memory_mb", "headroom_mb", "live_margin_mb", "enabled")

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)
    gpu = models.CharField(max_length=200, unique=True,
                           help_text="The GPU this device is: nvml:<uuid> (read through NVML) or declared:<name> "
                                     "(a GPU declared in settings). One GPU is one device.")
    memory_mb = models.PositiveIntegerField(validators=[MinValueValidator(1)],
                                            help_text="What the queue may hand out (MiB), at most the GPU's total.")
    headroom_mb = models.PositiveIntegerField(default=512, help_text="Never handed out (MiB).")
    live_margin_mb = models.PositiveIntegerField(
        default=256, help_text="Kept free of NVML's live free memory (MiB): other processes use GPUs too.")
    enabled = models.BooleanField(default=True)
    last_start_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["project", "name"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="scheduler_device_name"),
            models.CheckConstraint(condition=Q(headroom_mb__lt=models.F("memory_mb")),
                                   name="scheduler_device_headroom"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def usable_mb(self) -> int:
        return self.memory_mb - self.headroom_mb

    def clean(self) -> None:
        errors = {}
        if self.gpu and not GPU_KEY_RE.fullmatch(self.gpu):
            errors["gpu"] = "nvml:<uuid> or declared:<name>."
        if self.memory_mb is not None and self.headroom_mb is not None and self.headroom_mb >= self.memory_mb:
            errors["headroom_mb"] = "Must be less than the memory."
        if errors:
            raise ValidationError(errors)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


def validate_models(value) -> dict:
    """``{"model": {"load_mb": int, "request_mb": int}}``: what each model needs loaded and per request."""
    if not isinstance(value, dict) or not 0 < len(value) <= MAX_MODELS:
        raise ValidationError(f"An object of 1 to {MAX_MODELS} models: "
                              '{"llama-3-8b": {"load_mb": 16000, "request_mb": 1000}}.')
    for name, need in value.items():
        if not MODEL_NAME_RE.fullmatch(name):
            raise ValidationError(f"{name!r}: a model's name, 1 to 200 characters without spaces.")
        if not isinstance(need, dict) or set(need) != {"load_mb", "request_mb"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10_000_000 for v in need.values()):
            raise ValidationError(f"{name}: load_mb and request_mb, whole MiB.")
    return value


class Backend(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible server"
        HANDLER = "handler", "Task handler"

    FIELDS = ("name", "device", "kind", "url", "handler", "model_memory", "concurrency", "enabled")

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    device = models.ForeignKey(Device, on_delete=models.PROTECT, related_name="backends")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.OPENAI)
    url = models.CharField(max_length=500, blank=True, help_text="The server's base URL (openai): http://host:8000/v1.")
    handler = models.CharField(max_length=100, blank=True,
                               help_text="A handler registered in the scheduler (handler backends).")
    model_memory = models.JSONField(
        default=dict, validators=[validate_models],
        help_text='Memory per model (MiB), loaded and per request: {"llama-3-8b": {"load_mb": 16000, '
                  '"request_mb": 1000}}.')
    concurrency = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(1000)],
                                                   help_text="Tasks it runs at once.")
    enabled = models.BooleanField(default=True)
    last_start_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["project", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="scheduler_backend_name")]

    def __str__(self) -> str:
        return self.name

    def need(self, model: str) -> dict | None:
        return self.model_memory.get(model) if isinstance(self.model_memory, dict) else None

    def clean(self) -> None:
        from . import handlers  # the registry of handler names

        errors = {}
        if self.kind == self.Kind.OPENAI:
            if not self.url.lower().startswith(("http://", "https://")):
                errors["url"] = "An http(s) URL."
            if self.handler:
                errors["handler"] = "Only for handler backends."
        elif self.kind == self.Kind.HANDLER:
            if self.handler not in handlers.names():
                errors["handler"] = f"One of: {', '.join(sorted(handlers.names()))}."
        if self.device_id and self.project_id and self.device.project_id != self.project_id:
            errors["device"] = "A device of the same project."
        if errors:
            raise ValidationError(errors)

    def as_dict(self) -> dict:
        return {f: (self.device_id if f == "device" else getattr(self, f)) for f in self.FIELDS}


class LoadedModel(models.Model):
    """A model a backend holds in its device's memory. Loading and unloading rows hold their memory too:
    it counts as free only once the unload is done (and, with NVML, once it is measured free)."""

    class State(models.TextChoices):
        LOADING = "loading"
        LOADED = "loaded"
        UNLOADING = "unloading"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="loaded")
    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="loaded")
    model = models.CharField(max_length=200)
    memory_mb = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=State.choices)
    loading_task = models.ForeignKey("QueueTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    last_used_at = models.DateTimeField()
    changed_at = models.DateTimeField()

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["device", "last_used_at"]
        constraints = [models.UniqueConstraint(fields=["backend", "model"], name="scheduler_loaded_once")]

    def __str__(self) -> str:
        return f"{self.model} on {self.backend_id} ({self.state})"


class QueueTask(models.Model):
    class Kind(models.TextChoices):
        CHAT = "chat"
        EMBEDDING = "embedding"
        IMAGE = "image"
        CUSTOM = "custom"

    class State(models.TextChoices):
        QUEUED = "queued"
        ADMITTED = "admitted"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    HOLDING = (State.ADMITTED, State.RUNNING)  # hold their memory on their device
    TERMINAL = (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    public_id = models.CharField(max_length=40, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    api_key = models.ForeignKey("projects.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    requested_by = models.CharField(max_length=200, help_text="The key's name or the person's username.")
    end_user = models.CharField(max_length=256, blank=True)
    run_id = models.CharField(max_length=128, blank=True)
    span_id = models.CharField(max_length=128, blank=True)
    backend = models.ForeignKey(Backend, on_delete=models.PROTECT, related_name="tasks")
    device = models.ForeignKey(Device, on_delete=models.PROTECT, related_name="tasks")
    model = models.CharField(max_length=200)
    memory_mb = models.PositiveIntegerField(help_text="Held on the device from admission to the end (MiB).")
    priority = models.SmallIntegerField(default=0, validators=[MinValueValidator(-100), MaxValueValidator(100)])
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    generation = models.PositiveIntegerField(default=0)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    redirects = models.PositiveSmallIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False, help_text="A running task is asked to stop.")
    redirect_to = models.ForeignKey(Backend, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                    help_text="A running task asked to stop and move there.")
    worker_id = models.CharField(max_length=64, blank=True, help_text="The Celery task id of its current attempt.")
    sent_at = models.DateTimeField(null=True, blank=True, help_text="When its message last went to the workers.")
    input = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001 - NULL = no key (unique)
    request_hash = models.CharField(max_length=64, blank=True, help_text="What was submitted under the key.")
    created_at = models.DateTimeField()
    queued_at = models.DateTimeField(help_text="When it last joined the queue (a requeue resets it).")
    admitted_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=["queued", "admitted", "running", "succeeded", "failed",
                                                          "cancelled"]), name="scheduler_task_state"),
            models.UniqueConstraint(fields=["project", "api_key", "idempotency_key"], name="scheduler_idempotency",
                                    condition=Q(idempotency_key__isnull=False)),
        ]
        indexes = [
            models.Index(fields=["device", "state"], name="scheduler_task_device_open",
                         condition=Q(state__in=["queued", "admitted", "running"])),
            models.Index(fields=["project", "state", "-created_at"], name="scheduler_task_by_state"),
            models.Index(fields=["project", "run_id"], name="scheduler_task_run"),
        ]

    def __str__(self) -> str:
        return f"task {self.public_id} {self.model} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL


class DispatchEvent(models.Model):
    """One step of a task's life: submitted, admitted, started, finished, cancelled, redirected, requeued,
    retried, or an operator's change; with who did it, where, and how long it waited or ran."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    task = models.ForeignKey(QueueTask, on_delete=models.CASCADE, related_name="history")
    at = models.DateTimeField()
    event = models.CharField(max_length=32)
    actor = models.CharField(max_length=200, blank=True, help_text="Who: a person, a key, or the dispatcher.")
    device = models.CharField(max_length=100, blank=True)
    backend = models.CharField(max_length=100, blank=True)
    generation = models.PositiveIntegerField(default=0)
    waited_ms = models.PositiveIntegerField(null=True, blank=True)
    ran_ms = models.PositiveIntegerField(null=True, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["task", "at"], name="scheduler_history")]

    def __str__(self) -> str:
        return f"{self.event} {self.task_id}"


class Control(models.Model):
    """An operator's setting on a project's whole queue (no device, no backend), a device or a backend:
    paused (nothing new starts; running tasks finish) and throttled (at least ``throttle_ms`` between
    starts). Read by the dispatcher inside its admission transaction."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    device = models.OneToOneField(Device, null=True, blank=True, on_delete=models.CASCADE, related_name="control")
    backend = models.OneToOneField(Backend, null=True, blank=True, on_delete=models.CASCADE, related_name="control")
    paused = models.BooleanField(default=False)
    throttle_ms = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(3_600_000)])
    reason = models.CharField(max_length=500, blank=True)
    updated_by = models.CharField(max_length=200, blank=True)
    updated_at = models.DateTimeField()

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["project", "id"]
        constraints = [
            models.UniqueConstraint(fields=["project"], name="scheduler_control_project",
                                    condition=Q(device__isnull=True, backend__isnull=True)),
            models.CheckConstraint(condition=Q(device__isnull=True) | Q(backend__isnull=True),
                                   name="scheduler_control_one_target"),
        ]

    def __str__(self) -> str:
        target = f"device {self.device_id}" if self.device_id else f"backend {self.backend_id}" \
            if self.backend_id else "queue"
        return f"{target}: {'paused' if self.paused else 'running'}, throttle {self.throttle_ms} ms"
