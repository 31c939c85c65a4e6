from typing import Any

from django.core.exceptions import ValidationError
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse

from .errors import ApiError, ErrorCode, ErrorSerializer

# The error answers every endpoint can give, for the schema.
ERROR_RESPONSES = {
    400: OpenApiResponse(ErrorSerializer, description="Invalid request (error_code invalid_request, ...)"),
    401: OpenApiResponse(ErrorSerializer, description="No, wrong, revoked or expired credentials"),
    403: OpenApiResponse(ErrorSerializer, description="Missing scope, person-only action, or role too low"),
    404: OpenApiResponse(ErrorSerializer, description="Not found, or not visible to the caller"),
    503: OpenApiResponse(ErrorSerializer, description="Temporarily unavailable; honour Retry-After"),
}

IDEMPOTENCY_HEADER = OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER, required=False)


def idempotency_key(request) -> str | None:
    """The request's ``Idempotency-Key`` (at most 200 characters), or None."""
    value = request.headers.get("Idempotency-Key") or None
    if value is not None and len(value) > 200:
        raise ApiError(ErrorCode.INVALID_REQUEST, "Idempotency-Key: at most 200 characters.",
                       details={"field": "Idempotency-Key"})
    return value


def query_params(serializer_class, request) -> dict[str, Any]:
    """Validated query parameters; the first one at fault is named in ``details.field`` (400)."""
    params = serializer_class(data=request.query_params)
    if not params.is_valid():
        field, messages = next(iter(params.errors.items()))
        message = messages[0] if isinstance(messages, list) else next(iter(messages.values()))[0]
        raise ApiError(ErrorCode.INVALID_REQUEST, f"{field}: {message}",
                       details={"field": field, "fields": params.errors})
    return params.validated_data


def invalid(exc: ValidationError) -> ApiError:
    """A model's or a service's ValidationError as the API's 400: the first field at fault named in
    ``details.field``, all of them in ``details.fields``."""
    errors = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
    field = next(iter(errors))
    return ApiError(ErrorCode.INVALID_REQUEST, f"{field}: {errors[field][0]}", details={"field": field,
                                                                                        "fields": errors})
