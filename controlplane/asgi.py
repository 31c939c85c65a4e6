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

application = ProtocolTypeRouter(
    {
        # Static files are served by the app itself so the embedded mode needs no other server.
        "http": ASGIStaticFilesHandler(django_asgi_app),
        # The origin check refuses a page of another site opening a socket with our session cookie.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
