"""OTLP ingest: admit a request (key, scope, rate, backlog), validate it, store it durably.

Shared by the HTTP receiver (``views``) and the gRPC server (``grpc_server``). The request is parsed
once here to count what is valid (for ``partial_success``) and stored as protobuf bytes in the run
log's inbox (kind ``otlp.traces`` / ``otlp.logs``); the worker decodes and normalises it
(``decoders``). OTLP exporters retry the same payload after a 503 or a timeout: spans are keyed by
(project, trace id, span id), so a resent batch never counts twice.
"""
from __future__ import annotations

import logging
import zlib

from django.conf import settings
from rest_framework.exceptions import AuthenticationFailed

from apps.common.errors import ErrorCode
from apps.projects.models import ApiKey
from apps.projects.services import api_key_authenticate
from apps.traces import services as traces
from apps.traces.services import Refusal

from . import otlp

logger = logging.getLogger(__name__)

TRACES_KIND = "otlp.traces"
LOGS_KIND = "otlp.logs"


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


def admit(raw_key: str | None) -> ApiKey:
    """The key, once it is valid, may ingest and the run log admits it (the same rate limit and backlog
    watermarks as the REST writes)."""
    key = authenticate(raw_key)
    traces.admit(key)
    return key


# --- bodies ------------------------------------------------------------------------------------------


def max_body_bytes() -> int:
    return settings.OTLP_MAX_BODY_BYTES


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
        traces.batch_accept(project=key.project, api_key=key, source=source, kind=kind, raw=raw,
                     item_count=accepted, response={"accepted": accepted, "rejected": rejected})
    return rejected, message


def accept_traces(key: ApiKey, body: bytes, content_type: str, *, source: str = "otlp") -> tuple[int, str]:
    return _accept(key, body, content_type, parse=otlp.parse_traces, count=otlp.count_traces, kind=TRACES_KIND,
                   noun="span", source=source)


def accept_logs(key: ApiKey, body: bytes, content_type: str, *, source: str = "otlp") -> tuple[int, str]:
    return _accept(key, body, content_type, parse=otlp.parse_logs, count=otlp.count_logs, kind=LOGS_KIND,
                   noun="log record", source=source)
