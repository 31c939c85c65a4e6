"""Live publishing from synchronous code: best effort, but never out of order."""
from __future__ import annotations

import threading

import pytest
from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

from apps.common import live


def test_a_burst_of_sync_publishes_arrives_in_the_order_it_was_made():
    layer = get_channel_layer()
    if isinstance(layer, InMemoryChannelLayer):
        pytest.skip("the in-memory layer sends inline (async_to_sync); the publisher thread is Redis's")
    channel = async_to_sync(layer.new_channel)()
    group = f"test-order-{threading.get_ident()}"
    async_to_sync(layer.group_add)(group, channel)
    try:
        for i in range(80):  # each a separate hand-over, as a chunk's commit after commit makes them
            live.publish(group, {"type": "test.n", "n": i})
        live.flush(timeout=10)
        got = [async_to_sync(layer.receive)(channel)["n"] for _ in range(80)]
    finally:
        async_to_sync(layer.group_discard)(group, channel)
    assert got == list(range(80))
