"""Admission to the run log's inbox: one path for every door (REST writes, OTLP/HTTP, OTLP/gRPC).

A request from an API key is admitted when the key is under its rate (``rate_check``: 429 +
Retry-After past it) and the inbox's backlog is under its watermarks (``backlog``: 503 +
Retry-After above INGEST_BACKLOG_HIGH until it falls under INGEST_BACKLOG_LOW). Each door turns a
:class:`Refusal` into its own wire form.

The backlog (records accepted, not yet projected) is a counter in the shared cache: every accept adds
its records once committed, every projection takes them off once committed, and the sweeper resets it
to the inbox's true figure (``backlog_reconcile``), so a count lost to a crash lasts one sweep at most.
Each request reads it (one cache GET), so the overshoot past the high mark is bounded by what is
admitted concurrently: at most the requests in flight at once, each at most MAX_SPANS_PER_REQUEST
records (REST) or one 20 MiB export (OTLP); never a second's worth of traffic, as with sampling.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.db.models import Sum

from apps.common.errors import ErrorCode

from .models import IngestBatch

logger = logging.getLogger(__name__)

BACKLOG_KEY = "traces:inbox-backlog"


@dataclass
class Refusal(Exception):
    """A request answered without storing anything. ``status`` is HTTP; ``grpc`` the gRPC code name."""

    status: int
    error_code: str
    message: str
    retry_after: int | None = None

    @property
    def grpc(self) -> str:
        return {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 413: "INVALID_ARGUMENT",
                415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(self.status, "INTERNAL")

    @property
    def rpc_code(self) -> int:
        """The google.rpc.Code number for the Status body."""
        return {"INVALID_ARGUMENT": 3, "UNAUTHENTICATED": 16, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
                "UNAVAILABLE": 14}.get(self.grpc, 13)


def rate_check(key) -> None:
    """Requests per minute per key (fixed one-minute windows in the shared cache), for every door.

    The limit is the key's ``rate_limit_per_minute`` or INGEST_RATE_LIMIT_PER_MINUTE (0 = none). A
    cache that cannot be reached lets the request through: limiting is not worth refusing data.
    """
    limit = key.rate_limit_per_minute if key.rate_limit_per_minute is not None else settings.INGEST_RATE_LIMIT_PER_MINUTE
    if not limit:
        return
    now = time.time()
    window = int(now // 60)
    # The key's creation time too: a key id reused by a recreated database never inherits a count.
    name = f"ingest-rate:{key.pk}:{int(key.created_at.timestamp())}:{window}"
    try:
        cache.add(name, 0, timeout=120)
        count = cache.incr(name)
    except Exception as exc:  # noqa: BLE001 - see docstring
        logger.warning("rate limit not checked (cache unavailable): %r", exc)
        return
    if count > limit:
        retry = max(1, int((window + 1) * 60 - now) + 1)
        raise Refusal(429, ErrorCode.RATE_LIMITED,
                      f"This API key is over its rate limit of {limit} requests per minute.", retry_after=retry)


def _inbox_backlog() -> int:
    return IngestBatch.objects.filter(
        status__in=[IngestBatch.Status.PENDING, IngestBatch.Status.PROCESSING],
    ).aggregate(n=Sum("item_count"))["n"] or 0


def backlog_add(n: int) -> None:
    """Records joined (+) or left (-) the inbox's backlog (called once the change has committed)."""
    if not n or not settings.INGEST_BACKLOG_HIGH:
        return
    try:
        if cache.get(BACKLOG_KEY) is None:
            return  # nothing to adjust: the next check reads the inbox
        cache.incr(BACKLOG_KEY, n)
    except Exception as exc:  # noqa: BLE001 - the sweeper's reconcile corrects the counter
        logger.debug("backlog counter not adjusted: %r", exc)


def backlog_reconcile() -> int:
    """Set the shared counter to the inbox's true backlog (the sweeper, and a check that finds no
    counter). Returns the figure."""
    pending = _inbox_backlog()
    try:
        cache.set(BACKLOG_KEY, pending, timeout=None)
    except Exception as exc:  # noqa: BLE001
        logger.warning("backlog counter not stored: %r", exc)
    return pending


class _Backlog:
    """High/low watermark over the shared counter; the shedding state is per process (hysteresis)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shedding = False
        self.pending = 0

    def current(self) -> int:
        try:
            value = cache.get(BACKLOG_KEY)
        except Exception as exc:  # noqa: BLE001 - no shared cache: read the inbox itself
            logger.warning("backlog counter unavailable, reading the inbox: %r", exc)
            return _inbox_backlog()
        return backlog_reconcile() if value is None else max(int(value), 0)

    def check(self) -> None:
        high = settings.INGEST_BACKLOG_HIGH
        if not high:
            return
        self.pending = self.current()
        with self.lock:
            if self.pending >= high:
                self.shedding = True
            elif self.pending < settings.INGEST_BACKLOG_LOW:
                self.shedding = False
            shedding = self.shedding
        if shedding:
            raise Refusal(503, ErrorCode.SERVICE_UNAVAILABLE,
                          f"The ingest backlog ({self.pending} records) is over its limit; retry later.",
                          retry_after=settings.INGEST_BACKLOG_RETRY_AFTER)

    def reset(self) -> None:
        with self.lock:
            self.shedding, self.pending = False, 0
        try:
            cache.delete(BACKLOG_KEY)
        except Exception:  # noqa: BLE001
            pass


backlog = _Backlog()


def admit(key) -> None:
    """Admit a write from an authenticated ``key`` (every door calls this): rate, then backlog."""
    rate_check(key)
    backlog.check()
