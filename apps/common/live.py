"""Publishing to the channel layer from anywhere (a request, a Celery task) without blocking it.

Live pages subscribe to groups; services publish after their transaction commits. Publishing is
best effort by design: a slow or unreachable channel layer is logged, never raised, and never holds
up the write that triggered it (bounded by ``PUBLISH_TIMEOUT``).

In embedded mode the worker runs on a thread of the Daphne process and the in-memory layer belongs
to Daphne's event loop, which is not thread-safe: ``bind_loop`` (called by ``serve``) lets a worker
thread hand the send to that loop instead of running it on a loop of its own.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 2.0
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: int | None = None


def bind_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _loop, _loop_thread
    _loop, _loop_thread = loop, threading.get_ident()


async def _send_many(layer, messages: list[tuple[str, dict]]) -> None:
    for group, message in messages:
        await asyncio.wait_for(layer.group_send(group, message), PUBLISH_TIMEOUT)


def _log_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        logger.warning("live publish failed: %r", exc)


def publish_many(messages: list[tuple[str, dict]]) -> None:
    """Send ``(group, message)`` pairs; never raises, never waits longer than PUBLISH_TIMEOUT per send."""
    if not messages:
        return
    try:
        layer = get_channel_layer()
        if layer is None:
            return
        if _loop is not None and _loop.is_running() and threading.get_ident() != _loop_thread:
            future = asyncio.run_coroutine_threadsafe(_send_many(layer, messages), _loop)
            future.add_done_callback(_log_failure)
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            async_to_sync(_send_many)(layer, messages)
        else:  # called from async code: schedule, do not block the loop
            asyncio.ensure_future(_send_many(layer, messages)).add_done_callback(_log_failure)
    except Exception as exc:  # noqa: BLE001 - publishing must never fail the caller
        logger.warning("live publish failed: %r", exc)


def publish(group: str, message: dict) -> None:
    publish_many([(group, message)])
