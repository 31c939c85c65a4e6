"""The queue over HTTP. Agents (keys with the ``queue`` scope) submit tasks and read theirs, by long-poll
(``GET /queue/tasks/{id}?wait=``, answered by ``waiter.py`` in front of Django when served over ASGI) or
by socket (``/ws/queue/tasks/{id}``); people read their projects' queues; operators (``operate_project``:
the operator and admin roles, never a key) pause, resume, throttle, cancel, redirect and reprioritise,
each audited with who and why."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, IDEMPOTENCY_HEADER, idempotency_key, query_params
from apps.common.errors import ApiError, ErrorCode, ErrorSerializer
from apps.projects.permissions import PersonOnly, ProjectScopedAPIView, is_agent, require_scope

from . import selectors, services
from .models import Backend, Device
from .serializers import (
    QueueControlIn,
    QueueControlOut,
    QueueOut,
    TaskCancelIn,
    TaskIn,
    TaskListOut,
    TaskListQuery,
    TaskOut,
    TaskPriorityIn,
    TaskRedirectIn,
    TaskWaitQuery,
)

SCOPE = "queue"
OPERATE = "operate_project"
CLOSED = {409: OpenApiResponse(ErrorSerializer, description="task_closed: the task has ended (or, for a priority, "
                                                            "has left the queue)")}


def _agent(request) -> None:
    if not is_agent(request):
        raise PermissionDenied("Tasks are submitted by an API key with the 'queue' scope.",
                               code=ErrorCode.API_KEY_REQUIRED)
    require_scope(request, SCOPE)


def _json(task) -> dict:
    return selectors.task_json(task, selectors.history_of(task))


class TaskListView(ProjectScopedAPIView):
    @extend_schema(operation_id="queue_tasks_list",
                   summary="Queue tasks, newest first (people: their projects'; keys: their project's)",
                   parameters=[TaskListQuery], responses={200: TaskListOut, **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, SCOPE)
        q = query_params(TaskListQuery, request)
        rows = selectors.tasks(principal=self.access, project_slug=q.get("project"), state=q.get("state"),
                               backend=q.get("backend"), before=q.get("before"), limit=q["limit"])
        return Response({"results": [selectors.task_json(t, with_position=False) for t in rows],
                         "next_before": rows[-1].pk if len(rows) == q["limit"] else None})

    @extend_schema(summary="Submit GPU work (agent keys, queue scope)",
                   description="Admitted when its device has the memory (the smaller of the queue's ledger and "
                               "NVML's live reading) and its backend a free slot, by priority then age. 422 "
                               "model_not_served, exceeds_device (it could not fit even on a drained device). "
                               "Send an Idempotency-Key to submit at most once. Wait with GET ?wait=, or the "
                               "WebSocket /ws/queue/tasks/{id}.",
                   parameters=[IDEMPOTENCY_HEADER],
                   request=TaskIn, responses={201: TaskOut, 200: TaskOut, **ERROR_RESPONSES})
    def post(self, request):
        _agent(request)
        ser = TaskIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        idem = idempotency_key(request)
        key = request.user
        done = services.submit(project=key.project, key=key, kind=d["kind"], model=d["model"], backend=d["backend"],
                               memory_mb=d.get("memory_mb"), priority=d["priority"], task_input=d["input"],
                               run_id=d["run_id"], span_id=d["span_id"], end_user=d["end_user"],
                               max_attempts=d["max_attempts"], idempotency_key=idem)
        return Response(_json(done.task), status=status.HTTP_201_CREATED if done.created else status.HTTP_200_OK)


class TaskDetailView(ProjectScopedAPIView):
    @extend_schema(summary="A task, with its position in the queue and its dispatch history; ?wait=N waits up to "
                           "N seconds for it to end",
                   parameters=[TaskWaitQuery], responses={200: TaskOut, **ERROR_RESPONSES})
    def get(self, request, task_id: str):
        require_scope(request, SCOPE)
        query_params(TaskWaitQuery, request)
        return Response(_json(selectors.task(principal=self.access, task_id=task_id)))


class _Operate(ProjectScopedAPIView):
    """An operator's action on one task: people holding ``operate_project`` on its project."""

    permission_classes = [PersonOnly]

    def found(self, task_id: str):
        task = selectors.task(principal=self.access, task_id=task_id)
        self.require_perm(task.project, OPERATE)
        return task


class TaskCancelView(_Operate):
    @extend_schema(summary="Cancel a task (operators; audited)",
                   description="Queued or admitted: it never starts. Running: its worker is asked to stop and ends "
                               "it cancelled; with force, it is ended now and its worker process killed.",
                   request=TaskCancelIn, responses={200: TaskOut, **ERROR_RESPONSES, **CLOSED})
    def post(self, request, task_id: str):
        task = self.found(task_id)
        ser = TaskCancelIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        return Response(_json(services.cancel(task=task, user=request.user, reason=d["reason"], force=d["force"])))


class TaskRedirectView(_Operate):
    @extend_schema(summary="Move a task to another backend (operators; audited)",
                   description="Queued or admitted: it moves to the other backend's queue now. Running: its worker "
                               "is asked to stop, then it joins the other backend's queue; the trace shows both "
                               "attempts.",
                   request=TaskRedirectIn, responses={200: TaskOut, **ERROR_RESPONSES, **CLOSED})
    def post(self, request, task_id: str):
        task = self.found(task_id)
        ser = TaskRedirectIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        backend = Backend.objects.filter(project_id=task.project_id, name=d["backend"]).first()
        if backend is None:
            raise ApiError(ErrorCode.INVALID_REQUEST, f"No backend {d['backend']!r} in this project.",
                           details={"field": "backend"})
        return Response(_json(services.redirect(task=task, backend=backend, user=request.user, reason=d["reason"])))


class TaskPriorityView(_Operate):
    @extend_schema(summary="Reprioritise a queued task (operators; audited)",
                   request=TaskPriorityIn, responses={200: TaskOut, **ERROR_RESPONSES, **CLOSED})
    def post(self, request, task_id: str):
        task = self.found(task_id)
        ser = TaskPriorityIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        return Response(_json(services.reprioritise(task=task, priority=d["priority"], user=request.user,
                                                    reason=d["reason"])))


class QueueView(ProjectScopedAPIView):
    @extend_schema(summary="A project's queue now: devices (memory held, free by ledger and by NVML), backends "
                           "(queued, running, draining), depth, waits, paused and throttled states",
                   responses={200: QueueOut, **ERROR_RESPONSES})
    def get(self, request, slug: str):
        require_scope(request, "read")
        project = self.get_project(slug)
        return Response(selectors.queue_state(project=project).as_json())


class ControlView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    @extend_schema(summary="Pause, resume or throttle the queue, a device or a backend (operators; audited)",
                   description="Paused: nothing new starts there; running tasks finish. Throttled: at least "
                               "throttle_ms between starts on that device or backend.",
                   request=QueueControlIn, responses={200: QueueControlOut, **ERROR_RESPONSES})
    def post(self, request, slug: str):
        project = self.get_project(slug)
        self.require_perm(project, OPERATE)
        ser = QueueControlIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        device = backend = None
        if d.get("device"):
            device = Device.objects.filter(project=project, name=d["device"]).first()
            if device is None:
                raise ApiError(ErrorCode.INVALID_REQUEST, f"No device {d['device']!r}.", details={"field": "device"})
        if d.get("backend"):
            backend = Backend.objects.filter(project=project, name=d["backend"]).first()
            if backend is None:
                raise ApiError(ErrorCode.INVALID_REQUEST, f"No backend {d['backend']!r}.",
                               details={"field": "backend"})
        control = services.control_set(project=project, user=request.user, device=device, backend=backend,
                                       paused=d.get("paused"), throttle_ms=d.get("throttle_ms"), reason=d["reason"])
        target = f"device {device.name}" if device else f"backend {backend.name}" if backend else "queue"
        return Response({"target": target, "paused": control.paused, "throttle_ms": control.throttle_ms,
                         "reason": control.reason, "updated_by": control.updated_by,
                         "updated_at": control.updated_at.isoformat()})
