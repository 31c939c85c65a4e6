"""The queue API's inputs and outputs (the outputs for the schema: ``selectors.task_json`` and
``selectors.QueueState.as_json`` write them)."""
from __future__ import annotations

from django.core.validators import RegexValidator
from rest_framework import serializers

from .models import QueueTask

_NO_NUL = RegexValidator(r"^[^\x00]*$", "must not contain NUL.")


def _text(max_length: int, **kw):
    return serializers.CharField(max_length=max_length, required=False, default="", allow_blank=True,
                                 validators=[_NO_NUL], **kw)


class TaskIn(serializers.Serializer):
    kind = serializers.ChoiceField(choices=QueueTask.Kind.choices)
    model = serializers.CharField(max_length=200, validators=[_NO_NUL])
    backend = _text(100, help_text="A backend by name; empty: of those serving the model, the least busy.")
    memory_mb = serializers.IntegerField(min_value=0, max_value=10_000_000, required=False, allow_null=True,
                                         help_text="Memory to hold while it runs (MiB); at least the backend's "
                                                   "per-request need for the model, which is the default.")
    priority = serializers.IntegerField(min_value=-100, max_value=100, default=0,
                                        help_text="Higher first; a waiting task gains a point every "
                                                  "SCHEDULER_AGING_SECONDS.")
    input = serializers.JSONField(required=False, default=dict,
                                  help_text="What the backend runs: an OpenAI request body (chat, embedding), or "
                                            "the handler's input.")
    max_attempts = serializers.IntegerField(min_value=1, max_value=10, default=3,
                                            help_text="Attempts before a task whose worker is lost fails.")
    run_id = _text(128, help_text="The run it belongs to: its life is recorded on that run's trace.")
    span_id = _text(128, help_text="The span it belongs to (its spans' parent).")
    end_user = _text(256)

    def validate_input(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("An object.")
        return value


class TaskHistoryOut(serializers.Serializer):
    at = serializers.DateTimeField()
    event = serializers.CharField()
    actor = serializers.CharField()
    device = serializers.CharField()
    backend = serializers.CharField()
    generation = serializers.IntegerField()
    waited_ms = serializers.IntegerField(allow_null=True)
    ran_ms = serializers.IntegerField(allow_null=True)
    detail = serializers.DictField()


class TaskOut(serializers.Serializer):
    id = serializers.CharField()
    project = serializers.CharField()
    kind = serializers.ChoiceField(choices=QueueTask.Kind.choices)
    state = serializers.ChoiceField(choices=QueueTask.State.choices)
    model = serializers.CharField()
    backend = serializers.CharField()
    device = serializers.CharField()
    memory_mb = serializers.IntegerField()
    priority = serializers.IntegerField()
    attempts = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    redirects = serializers.IntegerField()
    requested_by = serializers.CharField()
    end_user = serializers.CharField()
    run_id = serializers.CharField()
    span_id = serializers.CharField()
    stop_requested = serializers.BooleanField(help_text="A running task asked to stop (cancel or redirect).")
    position = serializers.IntegerField(allow_null=True, help_text="1 is next on its device; null once admitted.")
    created_at = serializers.DateTimeField()
    queued_at = serializers.DateTimeField()
    admitted_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    result = serializers.JSONField(allow_null=True)
    error_code = serializers.CharField(allow_null=True)
    error_message = serializers.CharField(allow_null=True)
    history = TaskHistoryOut(many=True, required=False)


class TaskListOut(serializers.Serializer):
    results = TaskOut(many=True)
    next_before = serializers.IntegerField(allow_null=True)


class TaskListQuery(serializers.Serializer):
    project = serializers.SlugField(required=False)
    state = serializers.ChoiceField(choices=QueueTask.State.choices, required=False)
    backend = serializers.CharField(max_length=100, required=False)
    before = serializers.IntegerField(min_value=1, required=False)
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)


class TaskWaitQuery(serializers.Serializer):
    wait = serializers.IntegerField(min_value=1, max_value=30, required=False,
                                    help_text="Seconds to wait for the task to finish (answered at once when it has).")


class QueueReasonIn(serializers.Serializer):
    reason = _text(500, help_text="Why (kept in the audit log and the task's history).")


class TaskCancelIn(QueueReasonIn):
    force = serializers.BooleanField(default=False, help_text="A running task: end it now and kill its worker "
                                                              "process (the last resort; audited as such).")


class TaskRedirectIn(QueueReasonIn):
    backend = serializers.CharField(max_length=100, help_text="The backend to move it to (by name).")


class TaskPriorityIn(QueueReasonIn):
    priority = serializers.IntegerField(min_value=-100, max_value=100)


class QueueControlIn(QueueReasonIn):
    device = serializers.CharField(max_length=100, required=False, help_text="A device by name; with no device "
                                                                             "and no backend: the whole queue.")
    backend = serializers.CharField(max_length=100, required=False)
    paused = serializers.BooleanField(required=False)
    throttle_ms = serializers.IntegerField(min_value=0, max_value=3_600_000, required=False,
                                           help_text="At least this long between starts (a device or a backend).")

    def validate(self, data):
        if "paused" not in data and "throttle_ms" not in data:
            raise serializers.ValidationError({"paused": "Say paused and/or throttle_ms."})
        return data


class QueueControlOut(serializers.Serializer):
    target = serializers.CharField()
    paused = serializers.BooleanField()
    throttle_ms = serializers.IntegerField()
    reason = serializers.CharField()
    updated_by = serializers.CharField()
    updated_at = serializers.DateTimeField()


class DeviceOut(serializers.Serializer):
    name = serializers.CharField()
    gpu = serializers.CharField()
    enabled = serializers.BooleanField()
    memory_mb = serializers.IntegerField()
    headroom_mb = serializers.IntegerField()
    usable_mb = serializers.IntegerField()
    held_mb = serializers.IntegerField()
    held_by_tasks_mb = serializers.IntegerField()
    held_by_models_mb = serializers.IntegerField()
    free_mb = serializers.IntegerField(help_text="What admission can give now: the smaller of ledger and live.")
    ledger_free_mb = serializers.IntegerField()
    live_free_mb = serializers.IntegerField(allow_null=True, help_text="NVML's free less the margin; null: no "
                                                                       "fresh reading (the ledger decides).")
    reading = serializers.DictField(allow_null=True)
    paused = serializers.BooleanField()
    throttle_ms = serializers.IntegerField()
    models = serializers.ListField(child=serializers.DictField())


class BackendOut(serializers.Serializer):
    name = serializers.CharField()
    device = serializers.CharField()
    kind = serializers.CharField()
    enabled = serializers.BooleanField()
    concurrency = serializers.IntegerField()
    models = serializers.ListField(child=serializers.CharField())
    queued = serializers.IntegerField()
    admitted = serializers.IntegerField()
    running = serializers.IntegerField()
    draining = serializers.IntegerField(help_text="Running while paused: they finish, nothing new starts.")
    paused = serializers.BooleanField()
    throttle_ms = serializers.IntegerField()


class QueueOut(serializers.Serializer):
    paused = serializers.BooleanField()
    reason = serializers.CharField()
    depth = serializers.IntegerField()
    oldest_wait_seconds = serializers.FloatField(allow_null=True)
    wait_p50_ms = serializers.IntegerField(allow_null=True)
    wait_p95_ms = serializers.IntegerField(allow_null=True)
    admitted_last_15_min = serializers.IntegerField()
    devices = DeviceOut(many=True)
    backends = BackendOut(many=True)
