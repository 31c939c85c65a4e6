"""Agents waiting without a thread: a long-poll in front of Django and a WebSocket, for any project-owned
row an agent waits on (an approval's decision, a queue task's end). One shape for every app:

``Waitable`` names what is waited on: the path of its long-poll (``GET <path>?wait=N``, 1..``max_wait``
seconds), the key scope it needs, its live group (the owning app's ``live.py`` publishes there after each
commit) and ``read(access, id) -> Read`` (run on the app's own database threads, ``DbThreads``, never on
the views' one thread). ``long_poll(waitable)`` is the plain ASGI app ``controlplane/asgi.py`` sends those
requests to before Django; ``WaitConsumer`` (subclassed with ``waitable`` set) the socket.

Both subscribe to the row's group first and then read the row: a change committed between the two is in
the row or in the group. The database is the truth (every answer is read from it); a group message only
wakes the reader, so a lost one delays an answer to the end of the wait, never changes it. A key needs the
waitable's scope and sees its own project's rows; a person (the session, resolved by Channels' auth
middleware; the long-poll only) sees the projects they hold a role in (``access.project_access``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.db import DatabaseError
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from apps.common.errors import RETRY_AFTER_SECONDS, ErrorCode, envelope

from .access import ProjectAccess, project_access
from .services import api_key_authenticate

logger = logging.getLogger(__name__)

CLOSE = {401: 4401, 403: 4403, 404: 4404}


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass(frozen=True)
class Read:
    waiting: bool  # still worth waiting on (pending, queued, running)
    body: dict  # the answer, as the API's detail view gives it
    wake_at: datetime | None = None  # wake then even without a message (a deadline the read records)


@dataclass(frozen=True)
class Waitable:
    name: str
    path: re.Pattern  # group 1: the row's public id
    scope: str  # the key scope it needs
    max_wait: Callable[[], int]
    group: Callable[[str], str]
    read: Callable[[ProjectAccess, str], Awaitable[Read]]  # raises Refused(404) for what the caller may not see
    principal: Callable[..., Awaitable[ProjectAccess]]  # ``authenticate`` on the app's database threads


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def authenticate(scope, *, key_scope: str, keys_only: bool = False) -> ProjectAccess:
    """The key presented (``Authorization: Bearer`` or ``X-API-Key``, holding ``key_scope``), else the
    session's person (unless ``keys_only``). Synchronous: callers run it on their database threads."""
    headers = _headers(scope)
    auth = headers.get("authorization", "")
    raw = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key")
    if raw:
        try:
            key = api_key_authenticate(raw)
        except AuthenticationFailed as exc:
            raise Refused(401, exc.get_codes() if isinstance(exc.get_codes(), str) else ErrorCode.INVALID_API_KEY,
                          str(exc.detail)) from None
        if not key.has_scope(key_scope):
            raise Refused(403, ErrorCode.MISSING_SCOPE, f"This API key lacks the '{key_scope}' scope.")
        return project_access(key)
    user = None if keys_only else scope.get("user")
    if user is None or not user.is_authenticated:
        raise Refused(401, ErrorCode.NOT_AUTHENTICATED, "Authentication credentials were not provided.",
                      {"WWW-Authenticate": 'Bearer realm="controlplane"'})
    return project_access(user)


def wait_seconds(waitable: Waitable, scope) -> int | None:
    """The seconds this request asks to wait, when it is one for the long-poll (a GET of one row with a
    valid ``wait``); None: Django answers it (no wait, or a ``wait`` to refuse with a 400)."""
    if scope.get("type") != "http" or scope.get("method") != "GET" or not waitable.path.match(scope.get("path", "")):
        return None
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("wait")
    if not values or not re.fullmatch(r"[0-9]{1,2}", values[-1]):
        return None
    seconds = int(values[-1])
    return seconds if 1 <= seconds <= waitable.max_wait() else None


async def _answer(send, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"cache-control", b"no-store")]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _drain_body(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def long_poll(waitable: Waitable):
    """The ASGI app answering ``GET <path>?wait=N``: at once when the row is no longer worth waiting on,
    else as soon as it changes to that, else when the wait ends (the agent asks again on the same id)."""

    async def application(scope, receive, send) -> None:
        seconds = wait_seconds(waitable, scope)
        row_id = waitable.path.match(scope["path"]).group(1)
        await _drain_body(receive)
        layer = get_channel_layer()
        channel = group = None
        try:
            access = await waitable.principal(scope)
            # Subscribe first, then read: a change committed in between is in the row or in the group.
            channel = await layer.new_channel()
            group = waitable.group(row_id)
            await layer.group_add(group, channel)
            read = await waitable.read(access, row_id)
            if read.waiting:
                loop = asyncio.get_running_loop()
                ends = loop.time() + seconds
                gone = asyncio.ensure_future(receive())  # the client hanging up ends the wait
                try:
                    while read.waiting:
                        remaining = ends - loop.time()
                        if read.wake_at is not None:  # wake at the deadline: the read records it
                            remaining = min(remaining, (read.wake_at - timezone.now()).total_seconds() + 0.01)
                        if remaining <= 0:
                            break
                        nudged = asyncio.ensure_future(layer.receive(channel))
                        done, _ = await asyncio.wait({nudged, gone}, timeout=remaining,
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if not nudged.done():
                            nudged.cancel()
                        if gone in done:
                            return
                        read = await waitable.read(access, row_id)
                finally:
                    if not gone.done():
                        gone.cancel()
            await _answer(send, 200, read.body)
        except Refused as exc:
            await _answer(send, exc.status, envelope(exc.code, exc.message), exc.headers)
        except (DatabaseError, OSError) as exc:  # the database or the channel layer (Redis) unreachable
            logger.warning("%s long-poll: unavailable: %r", waitable.name, exc)
            await _answer(send, 503, envelope(ErrorCode.SERVICE_UNAVAILABLE, "The service is temporarily "
                                              "unavailable; retry later."), {"Retry-After": str(RETRY_AFTER_SECONDS)})
        finally:
            if group is not None:
                try:
                    await layer.group_discard(group, channel)
                except Exception as exc:  # noqa: BLE001 - the answer is sent; the group entry expires anyway
                    logger.warning("%s long-poll: leaving %s failed: %r", waitable.name, group, exc)

    return application


class WaitConsumer(AsyncJsonWebsocketConsumer):
    """An agent waiting on a WebSocket with its key (keys only: the route sits outside the pages' origin
    check, so a browser's session is never read here). It is sent the row at once and again on every
    change, and the socket is closed (1000) once the row is no longer worth waiting on. A subclass sets
    ``waitable`` and ``kwarg`` (the route's name for the id)."""

    waitable: Waitable
    kwarg = "id"
    group: str | None = None

    async def connect(self):
        row_id = self.scope["url_route"]["kwargs"][self.kwarg]
        try:
            self.access = await self.waitable.principal(self.scope, keys_only=True)
            await self.waitable.read(self.access, row_id)
        except Refused as exc:
            await self.accept()
            await self.send_json({"error_code": exc.code, "message": exc.message})
            await self.close(code=CLOSE.get(exc.status, 4400))
            return
        self.row_id = row_id
        self.group = self.waitable.group(row_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self._send_state()

    async def _send_state(self):
        try:
            read = await self.waitable.read(self.access, self.row_id)
        except Refused:
            await self.close(code=4404)
            return
        await self.send_json(read.body)
        if not read.waiting:
            await self.close(code=1000)

    _reading: asyncio.Task | None = None
    _stale = False
    _closed = False

    async def dispatch(self, message):
        """Every message of the row's group (whatever its type) is a nudge: send the row as it is now. Nudges
        that come while a read is under way coalesce into one more read after it (the latest state wins: a
        burst of changes costs two reads, not one each)."""
        if message["type"].startswith("websocket."):
            return await super().dispatch(message)
        self._stale = True
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._refresh())

    async def _refresh(self):
        try:
            while self._stale and not self._closed:
                self._stale = False
                await self._send_state()
        except Exception:  # the database gone mid-wait: the agent reconnects (its state is the row's)
            logger.warning("%s socket: reading %s failed", self.waitable.name, self.row_id, exc_info=True)
            await self.close(code=1011)

    async def close(self, code=None, reason=None):
        self._closed = True
        await super().close(code=code, reason=reason)

    async def disconnect(self, code):
        self._closed = True
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
