"""WebSocket routes of the pages (mounted by ``controlplane/asgi.py`` behind the session auth and the
origin check)."""
from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/overview/", consumers.OverviewConsumer.as_asgi()),
    path("ws/runs/", consumers.RunListConsumer.as_asgi()),
    path("ws/runs/<slug:project>/<str:run_id>/", consumers.RunConsumer.as_asgi()),
    path("ws/inbox/", consumers.InboxConsumer.as_asgi()),
    path("ws/evals/", consumers.EvalsConsumer.as_asgi()),
    path("ws/queue/", consumers.QueueConsumer.as_asgi()),
]
