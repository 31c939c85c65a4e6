from drf_spectacular.utils import OpenApiResponse

from .errors import ErrorSerializer

# The error answers every endpoint can give, for the schema.
ERROR_RESPONSES = {
    400: OpenApiResponse(ErrorSerializer, description="Invalid request (error_code invalid_request, ...)"),
    401: OpenApiResponse(ErrorSerializer, description="No, wrong, revoked or expired credentials"),
    403: OpenApiResponse(ErrorSerializer, description="Missing scope, person-only action, or role too low"),
    404: OpenApiResponse(ErrorSerializer, description="Not found, or not visible to the caller"),
    503: OpenApiResponse(ErrorSerializer, description="Temporarily unavailable; honour Retry-After"),
}
