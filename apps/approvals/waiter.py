"""The long-poll, in front of Django: ``GET /api/v1/approvals/{id}?wait=N`` (1..30 s) answers as soon as
the approval is no longer pending, else when the wait ends (still pending: the agent asks again on the
same id; it never holds one request for minutes).

A waiting agent holds no thread: this is a plain ASGI app (``controlplane/asgi.py`` sends it these
requests, and everything else to Django), awaiting the approval's Channels group. It subscribes first
and then reads the row, so a decision between the two is not missed; the database is the truth (every
answer is read from it), a lost group message only delays the answer to the end of the wait. Past the
approval's deadline it wakes, and the read records it expired. Nothing here ever changes an approval
but that expiry: a timeout answers ``pending``, never ``approved``.

The same checks as the API view (``api.ApprovalDetailView``, which answers ``wait`` at once where no
ASGI server runs): a key needs the ``approvals`` scope and sees its own project's approvals; a person
(the session, resolved by Channels' auth middleware) any project they hold a role in.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from urllib.parse import parse_qs

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from django.http import Http404
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from apps.common.dbthreads import DbThreads
from apps.common.errors import RETRY_AFTER_SECONDS, ErrorCode, envelope
from apps.projects.access import project_access
from apps.projects.services import api_key_authenticate

from . import live, selectors
from .models import Approval

logger = logging.getLogger(__name__)

# Waiters read on threads of their own: on Daphne's one thread for sync views, a hundred agents starting
# to wait at once queued behind each other and behind the approvers' decisions (bench/RESULTS.md).
_db = DbThreads("APPROVALS_DB_THREADS", "approvals-db")

PATH = re.compile(r"^/api/v1/approvals/(apr_[0-9a-f]{1,36})$")


def wait_seconds(scope) -> int | None:
    """The seconds this request asks to wait, when it is one for the waiter (a GET of one approval with a
    valid ``wait`` of 1..30); None: Django answers it (no wait, or a ``wait`` to refuse with a 400)."""
    if scope.get("type") != "http" or scope.get("method") != "GET" or not PATH.match(scope.get("path", "")):
        return None
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("wait")
    if not values or not re.fullmatch(r"[0-9]{1,2}", values[-1]):
        return None
    seconds = int(values[-1])
    return seconds if 1 <= seconds <= settings.APPROVALS_MAX_WAIT_SECONDS else None


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _answer(send, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"cache-control", b"no-store")]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@_db
def principal(scope, *, keys_only: bool = False):
    """The key presented (``Authorization: Bearer`` or ``X-API-Key``), else the session's person
    (unless ``keys_only``)."""
    headers = _headers(scope)
    auth = headers.get("authorization", "")
    raw = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key")
    if raw:
        try:
            key = api_key_authenticate(raw)
        except AuthenticationFailed as exc:
            raise Refused(401, exc.get_codes() if isinstance(exc.get_codes(), str) else ErrorCode.INVALID_API_KEY,
                           str(exc.detail)) from None
        if not key.has_scope("approvals"):
            raise Refused(403, ErrorCode.MISSING_SCOPE, "This API key lacks the 'approvals' scope.")
        return project_access(key)
    user = None if keys_only else scope.get("user")
    if user is None or not user.is_authenticated:
        raise Refused(401, ErrorCode.NOT_AUTHENTICATED, "Authentication credentials were not provided.",
                       {"WWW-Authenticate": 'Bearer realm="controlplane"'})
    return project_access(user)


@_db
def read_approval(access, approval_id: str) -> tuple[Approval, dict]:
    try:
        found = selectors.approval(principal=access, approval_id=approval_id)
    except Http404:
        raise Refused(404, ErrorCode.NOT_FOUND, "Not found.") from None
    return found, selectors.approval_json(found, selectors.decisions_of(found))


async def _drain_body(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def application(scope, receive, send) -> None:
    seconds = wait_seconds(scope)
    approval_id = PATH.match(scope["path"]).group(1)
    await _drain_body(receive)
    layer = get_channel_layer()
    channel = group = None
    try:
        access = await principal(scope)
        # Subscribe first, then read: a decision committed in between is in the row or in the group.
        channel = await layer.new_channel()
        group = live.approval_group(approval_id)
        await layer.group_add(group, channel)
        approval, body = await read_approval(access, approval_id)
        if approval.state == Approval.State.PENDING:
            loop = asyncio.get_running_loop()
            ends = loop.time() + seconds
            gone = asyncio.ensure_future(receive())  # the client hanging up ends the wait
            try:
                while approval.state == Approval.State.PENDING:
                    remaining = ends - loop.time()
                    if approval.expires_at is not None:  # wake at the deadline: the read records the expiry
                        remaining = min(remaining, (approval.expires_at - timezone.now()).total_seconds() + 0.01)
                    if remaining <= 0:
                        break
                    nudged = asyncio.ensure_future(layer.receive(channel))
                    done, _ = await asyncio.wait({nudged, gone}, timeout=remaining,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if not nudged.done():
                        nudged.cancel()
                    if gone in done:
                        return
                    approval, body = await read_approval(access, approval_id)
            finally:
                if not gone.done():
                    gone.cancel()
        await _answer(send, 200, body)
    except Refused as exc:
        await _answer(send, exc.status, envelope(exc.code, exc.message), exc.headers)
    except (DatabaseError, OSError) as exc:  # the database or the channel layer (Redis) unreachable
        logger.warning("approvals waiter: unavailable: %r", exc)
        await _answer(send, 503, envelope(ErrorCode.SERVICE_UNAVAILABLE, "The service is temporarily unavailable; "
                                          "retry later."), {"Retry-After": str(RETRY_AFTER_SECONDS)})
    finally:
        if group is not None:
            try:
                await layer.group_discard(group, channel)
            except Exception as exc:  # noqa: BLE001 - the answer is sent; the group entry expires anyway
                logger.warning("approvals waiter: leaving %s failed: %r", group, exc)
