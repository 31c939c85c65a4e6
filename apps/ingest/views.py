"""The OTLP/HTTP receiver: ``POST /v1/traces`` and ``POST /v1/logs``, as the OTLP specification says.

Protobuf or OTLP/JSON in, the same encoding out. Success is 200 (with ``partial_success`` naming
what was rejected); a malformed body is 400 with a ``google.rpc.Status``; an overloaded or
unreachable store is 503 + Retry-After and a key over its rate 429 + Retry-After, which exporters
retry. A transient fault is never a 500 (exporters drop data on 500).
"""
from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from apps.common.errors import RETRY_AFTER_SECONDS, ErrorCode
from apps.projects.authentication import presented_key

from . import otlp, services
from .services import Refusal

logger = logging.getLogger(__name__)


def store_unavailable() -> Refusal:
    """The database cannot be reached: both OTLP doors answer 503 / UNAVAILABLE with a retry delay,
    which exporters retry (on a 500 they would drop the data)."""
    return Refusal(503, ErrorCode.SERVICE_UNAVAILABLE, "The store is unavailable; retry later.",
                   retry_after=RETRY_AFTER_SECONDS)


def _content_type(request) -> str | None:
    value = (request.META.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
    if value in (otlp.PROTOBUF, "application/protobuf", "application/vnd.google.protobuf"):
        return otlp.PROTOBUF
    if value == otlp.JSON or value.endswith("+json"):
        return otlp.JSON
    return None


def _status(refusal: Refusal, content_type: str) -> HttpResponse:
    response = HttpResponse(otlp.status_body(refusal.rpc_code, refusal.message, content_type),
                            status=refusal.status, content_type=content_type)
    response["X-Error-Code"] = str(refusal.error_code)
    if refusal.retry_after is not None:
        response["Retry-After"] = str(refusal.retry_after)
    if refusal.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="controlplane"'
    return response


def _receive(request, accept, respond):
    content_type = _content_type(request) or otlp.JSON
    try:
        if request.method != "POST":
            response = _status(Refusal(405, ErrorCode.METHOD_NOT_ALLOWED, "Use POST."), content_type)
            response["Allow"] = "POST"
            return response
        if _content_type(request) is None and request.META.get("CONTENT_LENGTH") not in (None, "", "0"):
            raise Refusal(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                          "Send application/x-protobuf or application/json.")
        key = services.admit(presented_key(request))
        try:
            body = request.body
        except RequestDataTooBig:
            raise Refusal(413, ErrorCode.PAYLOAD_TOO_LARGE,
                          f"The body is larger than {services.max_body_bytes()} bytes.") from None
        body = services.decompress(body, request.META.get("HTTP_CONTENT_ENCODING", ""))
        if not body:
            rejected, message = 0, ""  # an empty export request: nothing to do, and that is success
        else:
            rejected, message = accept(key, body, content_type)
    except Refusal as refusal:
        return _status(refusal, content_type)
    except (OperationalError, InterfaceError) as exc:
        logger.warning("OTLP receiver: database unavailable: %s", exc)
        return _status(store_unavailable(), content_type)
    return HttpResponse(otlp.encode(respond(rejected, message), content_type), content_type=content_type)


@csrf_exempt
def traces(request):
    return _receive(request, services.accept_traces, otlp.traces_response)


@csrf_exempt
def logs(request):
    return _receive(request, services.accept_logs, otlp.logs_response)
