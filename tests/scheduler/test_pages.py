"""The queue on the product's pages: the live queue page (devices' memory, backends, open tasks, controls for
operators only), its live channel, and the overview's queue tile."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from apps.dashboard.routing import websocket_urlpatterns
from apps.scheduler import dispatcher, services
from apps.scheduler.models import GpuReading

pytestmark = pytest.mark.django_db


def signed_in(user) -> Client:
    c = Client()
    c.force_login(user)
    return c


@pytest.fixture
def busy(project, make_device, make_backend, tmp_path):
    device = make_device()
    make_backend(device, models={"m": {"load_mb": 2000, "request_mb": 1000}})
    tasks = [services.submit(project=project, kind="custom", model="m", end_user=f"user{i}",
                             task_input={"path": str(tmp_path / "d"), "tag": str(i)}).task for i in range(3)]
    dispatcher.dispatch_device(device.pk)
    return device, tasks


def test_the_queue_page_shows_memory_backends_and_tasks_and_controls_to_operators_only(busy, bob, olga):
    device, tasks = busy
    GpuReading.objects.create(gpu=device.gpu, source="nvml", total_mb=10_512, used_mb=3000, free_mb=7512,
                              utilization=42, read_at=timezone.now())
    page = signed_in(bob).get("/queue/").content.decode()
    assert 'data-queue-project="acme"' in page and 'data-may-operate="false"' in page
    assert 'data-device="gpu0"' in page  # the load and a task held, of 10,000:
    assert '<span data-figure="held">3\u202f000</span> / 10\u202f000 MiB' in page
    assert "7\u202f512 MiB" in page and "42 %" in page
    assert all(f'data-task="{t.public_id}"' in page for t in tasks)
    assert "data-control" not in page and "data-task-action" not in page  # an auditor steers nothing
    ops = signed_in(olga).get("/queue/").content.decode()
    assert 'data-may-operate="true"' in ops and 'data-device="gpu0"' in ops
    assert 'data-control data-project="acme" data-device="gpu0" data-paused="true"' in ops
    assert 'data-task-action="cancel"' in ops


def test_the_fragment_and_an_outsider(busy, bob, charlie):
    fragment = signed_in(bob).get("/queue/?fragment=queue").content.decode()
    assert 'data-queue-project="acme"' in fragment and "<html" not in fragment
    assert 'data-queue-project="acme"' not in signed_in(charlie).get("/queue/").content.decode()
    assert signed_in(charlie).get("/queue/?project=acme").status_code == 404


def test_the_page_asks_a_fixed_number_of_queries(busy, bob, django_assert_max_num_queries, tmp_path):
    device, _ = busy
    client = signed_in(bob)
    client.get("/queue/")
    with django_assert_max_num_queries(19):
        client.get("/queue/?fragment=queue")
    for i in range(10):  # more tasks, the same queries
        services.submit(project=device.project, kind="custom", model="m", task_input={"tag": str(i)})
    with django_assert_max_num_queries(19):
        client.get("/queue/?fragment=queue")


def test_the_overview_tile_shows_depth_running_and_what_is_paused(busy, bob, olga):
    device, _ = busy
    services.control_set(project=device.project, user=olga, device=device, paused=True, reason="swap the card")
    tiles = signed_in(bob).get("/?fragment=tiles").content.decode()
    assert 'data-tile="queue"' in tiles
    assert '<span data-figure="queue-depth">2</span>' in tiles and '<span data-figure="queue-running">1</span>' in tiles
    assert 'data-paused="device/gpu0"' in tiles


@pytest.mark.django_db(transaction=True)
def test_the_queue_channel_nudges_for_its_projects_tasks_and_not_for_others(
        project, other_project, make_device, make_backend, bob, tmp_path):
    make_backend(make_device(), models={"m": {"load_mb": 0, "request_mb": 10}})
    theirs = services.device_create(project=other_project, actor=None, name="g", gpu="declared:theirs",
                                    memory_mb=1000, headroom_mb=0)
    services.backend_create(project=other_project, actor=None, name="b", device=theirs, kind="handler",
                            handler="record", model_memory={"m": {"load_mb": 0, "request_mb": 10}})

    async def body():
        ws = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/queue/")
        ws.scope["user"] = bob
        assert (await ws.connect(timeout=5))[0]
        await database_sync_to_async(lambda: services.submit(project=other_project, kind="custom", model="m"))()
        assert await ws.receive_nothing(timeout=0.5)
        await database_sync_to_async(lambda: services.submit(project=project, kind="custom", model="m"))()
        got = await ws.receive_json_from(timeout=5)
        await ws.disconnect()
        return got

    assert async_to_sync(body)() == {"type": "changed", "state": "queued"}
