from typing import Any

from drf_spectacular.utils import OpenApiResponse

from .errors import ApiError, ErrorCode, ErrorSerializer

# The error answers every endpoint can give, for the schema.
ERROR_RESPONSES = {
    400: OpenApiResponse(ErrorSerializer, description="Invalid request (error_code invalid_request, ...)"),
    401: OpenApiResponse(ErrorSerializer, description="No, wrong, revoked or expired credentials"),
    403: OpenApiResponse(ErrorSerializer, description="Missing scope, person-only action, or role too low"),
    404: OpenApiResponse(ErrorSerializer, description="Not found, or not visible to the caller"),
    503: OpenApiResponse(ErrorSerializer, description="Temporarily unavailable; honour Retry-After"),
}


def query_params(serializer_class, request) -> dict[str, Any]:
    """Validated query parameters; the first one at fault is named in ``details.field`` (400)."""
    params = serializer_class(data=request.query_params)
    if not params.is_valid():
        field, messages = next(iter(params.errors.items()))
        message = messages[0] if isinstance(messages, list) else next(iter(messages.values()))[0]
        raise ApiError(ErrorCode.INVALID_REQUEST, f"{field}: {message}",
                       details={"field": field, "fields": params.errors})
    return params.validated_data
