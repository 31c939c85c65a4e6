"""Publishing to the channel layer from anywhere (a request, a Celery task) without blocking it.

Live pages subscribe to groups; services publish after their transaction commits. Publishing is
best effort by design: a slow or unreachable channel layer is logged, never raised, and never holds
up the write that triggered it (bounded by ``PUBLISH_TIMEOUT``).

Synchronous callers (a Celery task, a request thread) hand their sends to Redis through one event loop
per process, run by a daemon thread (``_Publisher``): the caller does not wait for Redis, and the
channel layer's connections (pooled per event loop) are kept instead of a loop and a connection made
per publish, which ``async_to_sync`` would cost (tens of milliseconds per publish on a busy machine,
paid by the dispatcher before its workers' messages went out). Sends stay in order; at exit the
pending ones get a moment. The in-memory layer (embedded mode, tests without Redis) keeps
``async_to_sync``: its queues belong to its consumers' loop.

In embedded mode the worker runs on a thread of the Daphne process and the in-memory layer belongs
to Daphne's event loop, which is not thread-safe: ``bind_loop`` (called by ``serve``) lets a worker
thread hand the send to that loop instead of running it on a loop of its own.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 2.0
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: int | None = None
_loop_order: asyncio.Lock | None = None


def bind_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _loop, _loop_thread, _loop_order
    _loop, _loop_thread, _loop_order = loop, threading.get_ident(), asyncio.Lock()


async def _send_many(layer, messages: list[tuple[str, dict]]) -> None:
    for group, message in messages:
        await asyncio.wait_for(layer.group_send(group, message), PUBLISH_TIMEOUT)


async def _send_in_order(order: asyncio.Lock, layer, messages: list[tuple[str, dict]]) -> None:
    """Sends handed to one loop from other threads run as concurrent tasks, which interleave at each
    await on Redis: a later publish could overtake an earlier one. ``asyncio.Lock`` wakes its waiters
    first come, first served, and the tasks start in the order they were handed over, so holding it
    around each hand-over keeps the publishes in the order they were made."""
    async with order:
        await _send_many(layer, messages)


def _log_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        logger.warning("live publish failed: %r", exc)


class _Publisher:
    """This process's publishing loop, on a daemon thread started at first use (again in a forked child:
    a loop and its connections never cross a fork)."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)
        atexit.register(self.flush)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pending: set[concurrent.futures.Future] = set()
        self._order: asyncio.Lock | None = None  # made with its loop

    def _running_loop(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Lock]:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="live-publisher", daemon=True)
                thread.start()
                self._loop, self._thread, self._order = loop, thread, asyncio.Lock()
            return self._loop, self._order

    def submit(self, layer, messages: list[tuple[str, dict]]) -> concurrent.futures.Future:
        loop, order = self._running_loop()
        future = asyncio.run_coroutine_threadsafe(_send_in_order(order, layer, messages), loop)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        future.add_done_callback(_log_failure)
        return future

    def flush(self, timeout: float = PUBLISH_TIMEOUT) -> None:
        """Wait (up to ``timeout``) for the sends handed over so far (at exit; tests)."""
        pending = list(self._pending)
        if pending:
            concurrent.futures.wait(pending, timeout=timeout)


_publisher = _Publisher()
flush = _publisher.flush


def publish_many(messages: list[tuple[str, dict]]) -> None:
    """Send ``(group, message)`` pairs; never raises, never waits longer than PUBLISH_TIMEOUT per send."""
    if not messages:
        return
    try:
        layer = get_channel_layer()
        if layer is None:
            return
        if _loop is not None and _loop.is_running() and threading.get_ident() != _loop_thread:
            future = asyncio.run_coroutine_threadsafe(_send_in_order(_loop_order, layer, messages), _loop)
            future.add_done_callback(_log_failure)
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if isinstance(layer, InMemoryChannelLayer):
                # Its queues belong to the event loop its consumers run on: asgiref sends from there
                # (a SyncToAsync thread's outer loop), never from a loop of our own.
                async_to_sync(_send_many)(layer, messages)
            else:
                _publisher.submit(layer, messages)
        else:  # called from async code: schedule, do not block the loop
            asyncio.ensure_future(_send_many(layer, messages)).add_done_callback(_log_failure)
    except Exception as exc:  # noqa: BLE001 - publishing must never fail the caller
        logger.warning("live publish failed: %r", exc)


def publish(group: str, message: dict) -> None:
    publish_many([(group, message)])
