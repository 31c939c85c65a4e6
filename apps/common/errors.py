"""One error envelope for the whole API: ``{"error_code", "message", "details"}``.

``error_code`` is a stable machine code from :class:`ErrorCode` (published in the OpenAPI schema);
``message`` is for people and may change; ``details`` holds structured context such as the fields
at fault. Faults that are ours and transient (database unreachable) answer 503 with Retry-After.
"""
from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError, InterfaceError, OperationalError, models
from django.http import Http404, JsonResponse
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response

logger = logging.getLogger(__name__)

# How long a client should wait after a transient fault of ours (the database unreachable): the one
# Retry-After of every door (the API, pages, OTLP/HTTP, OTLP/gRPC). Backlog shedding has its own,
# settings.INGEST_BACKLOG_RETRY_AFTER.
RETRY_AFTER_SECONDS = 5


class ErrorCode(models.TextChoices):
    """Stable machine codes. Add new ones; never rename or reuse one."""

    NOT_AUTHENTICATED = "not_authenticated"
    INVALID_API_KEY = "invalid_api_key"
    API_KEY_REVOKED = "api_key_revoked"
    API_KEY_EXPIRED = "api_key_expired"
    MISSING_SCOPE = "missing_scope"
    PERSON_ONLY = "person_only"
    API_KEY_REQUIRED = "api_key_required"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    INVALID_REQUEST = "invalid_request"
    PARSE_ERROR = "parse_error"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_ACCEPTABLE = "not_acceptable"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CONFLICT = "conflict"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RATE_LIMITED = "rate_limited"
    SERVICE_UNAVAILABLE = "service_unavailable"
    BUDGET_EXCEEDED = "budget_exceeded"
    MODEL_UNPRICED = "model_unpriced"
    RESERVATION_CLOSED = "reservation_closed"
    APPROVAL_CLOSED = "approval_closed"
    APPROVAL_EXPIRED = "approval_expired"
    ACTION_MISMATCH = "action_mismatch"
    SELF_APPROVAL = "self_approval"
    ALREADY_DECIDED = "already_decided"
    SCORE_EXISTS = "score_exists"
    JOB_RUNNING = "job_running"
    MODEL_NOT_SERVED = "model_not_served"
    EXCEEDS_DEVICE = "exceeds_device"
    TASK_CLOSED = "task_closed"
    BACKEND_BUSY = "backend_busy"
    INTERNAL_ERROR = "internal_error"


class ApiError(exceptions.APIException):
    """Raise from a view or service to answer with a specific code, status and details."""

    def __init__(self, error_code: str, message: str, *, status_code: int = 400, details: dict | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail=message)
        self.error_code = error_code
        self.status_code = status_code
        self.details = details or {}
        self.headers = headers or {}


class ErrorSerializer(serializers.Serializer):
    """The error envelope, for the schema."""

    error_code = serializers.ChoiceField(choices=ErrorCode.choices)
    message = serializers.CharField()
    details = serializers.DictField(required=False)


def envelope(error_code: str, message: str, details: dict | None = None) -> dict[str, Any]:
    return {"error_code": error_code, "message": message, "details": details or {}}


def retry_after_header() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


def unavailable_response() -> JsonResponse:
    """503 + Retry-After in the envelope, outside DRF (middleware, health check, the 500 handler)."""
    return JsonResponse(
        envelope(ErrorCode.SERVICE_UNAVAILABLE, "The service is temporarily unavailable; retry later."),
        status=503, headers=retry_after_header(),
    )


_AUTH_FAILED_CODES = {
    ErrorCode.INVALID_API_KEY,
    ErrorCode.API_KEY_REVOKED,
    ErrorCode.API_KEY_EXPIRED,
}


def _code_for(exc: exceptions.APIException) -> str:
    code = getattr(exc, "error_code", None)
    if code:
        return code
    if isinstance(exc, exceptions.NotAuthenticated):
        return ErrorCode.NOT_AUTHENTICATED
    if isinstance(exc, exceptions.AuthenticationFailed):
        detail_code = exc.get_codes() if isinstance(exc.detail, str) else None
        return detail_code if detail_code in _AUTH_FAILED_CODES else ErrorCode.INVALID_API_KEY
    if isinstance(exc, exceptions.PermissionDenied):
        detail_code = exc.get_codes() if isinstance(exc.detail, str) else None
        return detail_code if detail_code in {ErrorCode.MISSING_SCOPE, ErrorCode.PERSON_ONLY,
                                                         ErrorCode.API_KEY_REQUIRED} else (
            ErrorCode.PERMISSION_DENIED
        )
    if isinstance(exc, exceptions.NotFound):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, exceptions.ParseError):
        return ErrorCode.PARSE_ERROR
    if isinstance(exc, exceptions.ValidationError):
        return ErrorCode.INVALID_REQUEST
    if isinstance(exc, exceptions.MethodNotAllowed):
        return ErrorCode.METHOD_NOT_ALLOWED
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return ErrorCode.UNSUPPORTED_MEDIA_TYPE
    if isinstance(exc, exceptions.NotAcceptable):
        return ErrorCode.NOT_ACCEPTABLE
    if isinstance(exc, exceptions.Throttled):
        return ErrorCode.RATE_LIMITED
    return ErrorCode.INTERNAL_ERROR


def api_exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF exception handler producing the envelope for every error."""
    if isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DatabaseError) and "connection" in str(exc).lower()
    ):
        logger.warning("database unavailable: %s", exc)
        return Response(
            envelope(ErrorCode.SERVICE_UNAVAILABLE, "The database is unavailable; retry later."),
            status=503,
            headers=retry_after_header(),
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            detail=exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        )
    if not isinstance(exc, exceptions.APIException):
        return None  # a real bug: let Django's 500 handling log it

    details: dict[str, Any] = dict(getattr(exc, "details", {}) or {})
    if isinstance(exc, exceptions.ValidationError):
        message = "The request is invalid."
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        details.setdefault("fields", fields)
    else:
        message = str(exc.detail) if not isinstance(exc.detail, (list, dict)) else "Request failed."

    headers: dict[str, str] = dict(getattr(exc, "headers", {}) or {})
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))
    if exc.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))

    response = Response(envelope(_code_for(exc), message, details), status=exc.status_code, headers=headers)
    # DRF's APIView sets WWW-Authenticate from the authenticator on 401 after this returns.
    return response


def json_404(request, exception=None):
    return JsonResponse(envelope(ErrorCode.NOT_FOUND, "Not found."), status=404)


def json_500(request):
    return JsonResponse(envelope(ErrorCode.INTERNAL_ERROR, "Internal error."), status=500)
