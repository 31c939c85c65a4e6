"""ASGI entry point (Daphne): HTTP through Django, WebSockets through Channels."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
# Initialise Django before importing anything that touches models (consumers, routing).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from apps.dashboard.routing import websocket_urlpatterns  # noqa: E402 - the pages' live channels
from apps.gateway.app import application as gateway_app  # noqa: E402 - the model gateway (plain ASGI)

# Static files are served by the app itself so the embedded mode needs no other server.
django_http = ASGIStaticFilesHandler(django_asgi_app)


async def http(scope, receive, send):
    """The model gateway's calls go straight to its own ASGI app (no Django request, no middleware on
    the hot path); everything else to Django."""
    if scope["path"].startswith("/gateway/"):
        return await gateway_app(scope, receive, send)
    return await django_http(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http,
        # The origin check refuses a page of another site opening a socket with our session cookie.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
