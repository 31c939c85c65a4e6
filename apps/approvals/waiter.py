"""Agents waiting on an approval without a thread (``apps.projects.waiting``): the long-poll
``GET /api/v1/approvals/{id}?wait=N`` (1..30 s) answers as soon as the approval is no longer pending, else
when the wait ends (still pending: the agent asks again on the same id; it never holds one request for
minutes); the socket ``/ws/approvals/{id}`` is sent the approval at once and on every change.

Past the approval's deadline the wait wakes, and the read records it expired. Nothing here ever changes an
approval but that expiry: a timeout answers ``pending``, never ``approved``. The same checks as the API view
(``api.ApprovalDetailView``, which answers ``wait`` at once where no ASGI server runs): a key needs the
``approvals`` scope and sees its own project's approvals; a person any project they hold a role in.
"""
from __future__ import annotations

import re

from django.conf import settings
from django.http import Http404

from apps.common.dbthreads import DbThreads
from apps.common.errors import ErrorCode
from apps.projects import waiting
from apps.projects.waiting import Read, Refused, Waitable, WaitConsumer, authenticate

from . import live, selectors
from .models import Approval

# Waiters read on threads of their own: on Daphne's one thread for sync views, a hundred agents starting
# to wait at once queued behind each other and behind the approvers' decisions (bench/RESULTS.md).
_db = DbThreads("APPROVALS_DB_THREADS", "approvals-db")


@_db
def _principal(scope, *, keys_only: bool = False):
    return authenticate(scope, key_scope="approvals", keys_only=keys_only)


@_db
def _read(access, approval_id: str) -> Read:
    try:
        found = selectors.approval(principal=access, approval_id=approval_id)
    except Http404:
        raise Refused(404, ErrorCode.NOT_FOUND, "Not found.") from None
    return Read(waiting=found.state == Approval.State.PENDING,
                body=selectors.approval_json(found, selectors.decisions_of(found)), wake_at=found.expires_at)


APPROVAL = Waitable(name="approvals", path=re.compile(r"^/api/v1/approvals/(apr_[0-9a-f]{1,36})$"),
                    scope="approvals", max_wait=lambda: settings.APPROVALS_MAX_WAIT_SECONDS,
                    group=live.approval_group, read=_read, principal=_principal)
application = waiting.long_poll(APPROVAL)


def wait_seconds(scope) -> int | None:
    return waiting.wait_seconds(APPROVAL, scope)


class ApprovalWaitConsumer(WaitConsumer):
    """``/ws/approvals/{id}``: an agent with its key (the ``approvals`` scope); closed (1000) once the
    approval is no longer pending."""

    waitable = APPROVAL
    kwarg = "approval_id"
