"""OTLP ingest: admit a request (key, scope, rate, backlog), validate it, store it durably.

Shared by the HTTP receiver (``views``) and the gRPC server (``grpc_server``). The request is parsed
once here to count what is valid (for ``partial_success``) and stored as protobuf bytes in the run
log's inbox (kind ``otlp.traces`` / ``otlp.logs``); the worker decodes and normalises it
(``decoders``). OTLP exporters retry the same payload after a 503 or a timeout: spans are keyed by
(project, trace id, span id), so a resent batch never counts twice.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.db.models import Sum
from rest_framework.exceptions import AuthenticationFailed

from apps.common.errors import ErrorCode
from apps.projects.models import ApiKey
from apps.projects.services import api_key_authenticate
from apps.traces.models import IngestBatch
from apps.traces.services import batch_accept

from . import otlp

logger = logging.getLogger(__name__)

TRACES_KIND = "otlp.traces"
LOGS_KIND = "otlp.logs"


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


# --- admission ---------------------------------------------------------------------------------------


def authenticate(raw_key: str | None) -> ApiKey:
    if not raw_key:
        raise Refusal(401, ErrorCode.NOT_AUTHENTICATED,
                      "Send an API key: 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
    try:
        key = api_key_authenticate(raw_key)
    except AuthenticationFailed as exc:
        codes = exc.get_codes()
        raise Refusal(401, codes if isinstance(codes, str) else ErrorCode.INVALID_API_KEY, str(exc.detail)) from None
    if not key.has_scope("ingest"):
        raise Refusal(403, ErrorCode.MISSING_SCOPE, "This API key lacks the 'ingest' scope.")
    return key


def rate_check(key: ApiKey) -> None:
    """Requests per minute per key (fixed one-minute windows in the shared cache).

    The limit is the key's ``rate_limit_per_minute`` or INGEST_RATE_LIMIT_PER_MINUTE (0 = none). A
    cache that cannot be reached lets the request through: limiting is not worth refusing data.
    """
    limit = key.rate_limit_per_minute if key.rate_limit_per_minute is not None else \
        getattr(settings, "INGEST_RATE_LIMIT_PER_MINUTE", 0)
    if not limit:
        return
    now = time.time()
    window = int(now // 60)
    name = f"ingest-rate:{key.pk}:{window}"
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


class _Backlog:
    """High/low watermark on spans accepted but not yet projected.

    Above INGEST_BACKLOG_HIGH the receiver answers 503 + Retry-After (exporters back off and resend),
    until the backlog falls under INGEST_BACKLOG_LOW. The figure is read at most once per
    INGEST_BACKLOG_CHECK_SECONDS per process: one indexed aggregate over the pending rows.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.checked_at = 0.0
        self.pending = 0
        self.shedding = False

    def check(self) -> None:
        high = getattr(settings, "INGEST_BACKLOG_HIGH", 0)
        if not high:
            return
        low = getattr(settings, "INGEST_BACKLOG_LOW", high // 2)
        now = time.monotonic()
        if now - self.checked_at >= getattr(settings, "INGEST_BACKLOG_CHECK_SECONDS", 1.0):
            with self.lock:
                if now - self.checked_at >= getattr(settings, "INGEST_BACKLOG_CHECK_SECONDS", 1.0):
                    self.pending = IngestBatch.objects.filter(
                        status__in=[IngestBatch.Status.PENDING, IngestBatch.Status.PROCESSING],
                    ).aggregate(n=Sum("item_count"))["n"] or 0
                    self.checked_at = now
                    if self.pending >= high:
                        self.shedding = True
                    elif self.pending < low:
                        self.shedding = False
        if self.shedding:
            raise Refusal(503, ErrorCode.SERVICE_UNAVAILABLE,
                          f"The ingest backlog ({self.pending} spans) is over its limit; retry later.",
                          retry_after=getattr(settings, "INGEST_BACKLOG_RETRY_AFTER", 5))

    def reset(self) -> None:
        with self.lock:
            self.checked_at, self.pending, self.shedding = 0.0, 0, False


backlog = _Backlog()


def admit(raw_key: str | None) -> ApiKey:
    key = authenticate(raw_key)
    rate_check(key)
    backlog.check()
    return key


# --- bodies ------------------------------------------------------------------------------------------


def max_body_bytes() -> int:
    return getattr(settings, "OTLP_MAX_BODY_BYTES", 20 * 1024 * 1024)


def decompress(body: bytes, encoding: str) -> bytes:
    """Undo Content-Encoding, never producing more than the body limit (a gzip bomb stops there)."""
    encoding = (encoding or "identity").strip().lower()
    limit = max_body_bytes()
    if encoding in ("", "identity"):
        if len(body) > limit:
            raise Refusal(413, ErrorCode.PAYLOAD_TOO_LARGE, f"The body is larger than {limit} bytes.")
        return body
    if encoding not in ("gzip", "deflate", "x-gzip"):
        raise Refusal(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                      f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none).")
    inflater = zlib.decompressobj(wbits=47 if encoding != "deflate" else 15)  # 47: gzip or zlib header
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise Refusal(413, ErrorCode.PAYLOAD_TOO_LARGE,
                          f"The body is larger than {limit} bytes once decompressed.")
        if not inflater.eof:
            raise Refusal(400, ErrorCode.PARSE_ERROR, f"The {encoding} body is truncated.")
    except zlib.error as exc:
        raise Refusal(400, ErrorCode.PARSE_ERROR, f"The body is not valid {encoding}: {exc}.") from None
    return out


# --- accept ------------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _accept(key: ApiKey, body: bytes, content_type: str, *, parse, count, kind: str, noun: str,
            source: str) -> tuple[int, str]:
    """Validate and store one export request. Returns (items rejected, the English message for them)."""
    try:
        request = parse(body, content_type)
    except otlp.OtlpDecodeError as exc:
        raise Refusal(400, ErrorCode.PARSE_ERROR, str(exc)) from None
    accepted, rejected, first = count(request)
    message = f"{_plural(rejected, noun)} rejected; the first: {first}" if rejected else ""
    if accepted:
        raw = body if content_type == otlp.PROTOBUF else request.SerializeToString()
        batch_accept(project=key.project, api_key=key, source=source, kind=kind, raw=raw,
                     item_count=accepted, response={"accepted": accepted, "rejected": rejected})
    return rejected, message


def accept_traces(key: ApiKey, body: bytes, content_type: str, *, source: str = "otlp") -> tuple[int, str]:
    return _accept(key, body, content_type, parse=otlp.parse_traces, count=otlp.count_traces, kind=TRACES_KIND,
                   noun="span", source=source)


def accept_logs(key: ApiKey, body: bytes, content_type: str, *, source: str = "otlp") -> tuple[int, str]:
    return _accept(key, body, content_type, parse=otlp.parse_logs, count=otlp.count_logs, kind=LOGS_KIND,
                   noun="log record", source=source)
