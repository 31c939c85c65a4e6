"""Agents waiting on a queue task without a thread (``apps.projects.waiting``): the long-poll
``GET /api/v1/queue/tasks/{id}?wait=N`` (1..30 s; answered as soon as the task has ended, else with its
state when the wait ends: the agent asks again) and the socket ``/ws/queue/tasks/{id}`` (sent the task at
once and on every change; closed once it has ended). Reads run on threads of their own."""
from __future__ import annotations

import re

from django.conf import settings
from django.http import Http404

from apps.common.dbthreads import DbThreads
from apps.common.errors import ErrorCode
from apps.projects import waiting
from apps.projects.waiting import Read, Refused, Waitable, WaitConsumer, authenticate

from . import live, selectors

_db = DbThreads("SCHEDULER_DB_THREADS", "queue-db")


@_db
def _principal(scope, *, keys_only: bool = False):
    return authenticate(scope, key_scope="queue", keys_only=keys_only)


@_db
def _read(access, task_id: str) -> Read:
    try:
        task = selectors.task(principal=access, task_id=task_id)
    except Http404:
        raise Refused(404, ErrorCode.NOT_FOUND, "Not found.") from None
    return Read(waiting=not task.is_terminal, body=selectors.task_json(task, selectors.history_of(task)))


TASK = Waitable(name="queue", path=re.compile(r"^/api/v1/queue/tasks/(qt_[0-9a-f]{1,36})$"), scope="queue",
                max_wait=lambda: settings.SCHEDULER_MAX_WAIT_SECONDS, group=live.task_group, read=_read,
                principal=_principal)
application = waiting.long_poll(TASK)


def wait_seconds(scope) -> int | None:
    return waiting.wait_seconds(TASK, scope)


class TaskWaitConsumer(WaitConsumer):
    waitable = TASK
    kwarg = "task_id"
