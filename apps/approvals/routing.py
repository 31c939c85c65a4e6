"""The agents' WebSocket route (mounted by ``controlplane/asgi.py``, keys only, outside the pages' origin
check)."""
from django.urls import path

from . import waiter

websocket_urlpatterns = [
    path("ws/approvals/<str:approval_id>", waiter.ApprovalWaitConsumer.as_asgi()),
]
