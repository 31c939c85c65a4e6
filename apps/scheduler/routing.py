"""The agents' WebSocket route of the queue (mounted by ``controlplane/asgi.py``, keys only, outside the
pages' origin check)."""
from django.urls import path

from . import waiter

websocket_urlpatterns = [
    path("ws/queue/tasks/<str:task_id>", waiter.TaskWaitConsumer.as_asgi()),
]
