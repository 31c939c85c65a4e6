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

from apps.approvals import waiter as approvals_waiter  # noqa: E402 - agents' long-polls (plain ASGI)
from apps.approvals.routing import websocket_urlpatterns as approval_websockets  # noqa: E402 - agents wait on these
from apps.dashboard.routing import websocket_urlpatterns  # noqa: E402 - the pages' live channels
from apps.gateway.app import application as gateway_app  # noqa: E402 - the model gateway (plain ASGI)
from apps.scheduler import waiter as queue_waiter  # noqa: E402 - agents' long-polls on queue tasks
from apps.scheduler.routing import websocket_urlpatterns as queue_websockets  # noqa: E402

# Static files are served by the app itself so the embedded mode needs no other server.
django_http = ASGIStaticFilesHandler(django_asgi_app)
# The session's person, for a long-poll sent from a signed-in browser (keys are read by the waiter).
approvals_wait = AuthMiddlewareStack(approvals_waiter.application)
queue_wait = AuthMiddlewareStack(queue_waiter.application)


async def http(scope, receive, send):
    """The model gateway's calls go straight to its own ASGI app (no Django request, no middleware on
    the hot path); an approval's or a queue task's long-poll to its app's waiter (a waiting agent holds no
    thread); everything else to Django."""
    if scope["path"].startswith("/gateway/"):
        return await gateway_app(scope, receive, send)
    if approvals_waiter.wait_seconds(scope) is not None:
        return await approvals_wait(scope, receive, send)
    if queue_waiter.wait_seconds(scope) is not None:
        return await queue_wait(scope, receive, send)
    return await django_http(scope, receive, send)


# The origin check refuses a page of another site opening a socket with our session cookie. Agents'
# sockets (/ws/approvals/, /ws/queue/tasks/) carry a key, never read the session, and come with no Origin:
# outside it.
pages_ws = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
agents_ws = URLRouter(approval_websockets + queue_websockets)


async def websocket(scope, receive, send):
    if scope["path"].startswith(("/ws/approvals/", "/ws/queue/tasks/")):
        return await agents_ws(scope, receive, send)
    return await pages_ws(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": websocket,
    }
)
