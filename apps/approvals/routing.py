"""The agents' WebSocket route (mounted by ``controlplane/asgi.py``, keys only, outside the pages' origin
check)."""
from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/approvals/<str:approval_id>", consumers.ApprovalWaitConsumer.as_asgi()),
]
