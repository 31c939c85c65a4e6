from rest_framework.authentication import BaseAuthentication

from .models import API_KEY_PREFIX
from .services import api_key_authenticate


def presented_key(request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, if any."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.META.get("HTTP_X_API_KEY") or None


class ApiKeyAuthentication(BaseAuthentication):
    """Authenticates agents. ``request.user`` and ``request.auth`` are both the ApiKey, never a person."""

    def authenticate(self, request):
        raw = presented_key(request)
        if raw is None:
            return None
        key = api_key_authenticate(raw)
        return (key, key)

    def authenticate_header(self, request):
        return f'Bearer realm="controlplane", charset="UTF-8", hint="{API_KEY_PREFIX}..."'
