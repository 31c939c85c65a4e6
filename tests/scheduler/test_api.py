"""The queue over HTTP: agents submit and read (their project's only), people read their projects' queues,
operators steer (audited, with who and why), agents and auditors never steer. The waits (long-poll in front
of Django, the agents' socket) run through the application's real ASGI router and channel layer."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.db import connection
from rest_framework.test import APIClient

from apps.audit.models import AuditEvent
from apps.scheduler import dispatcher, executor, services
from apps.scheduler.models import Control, QueueTask
from controlplane.asgi import application

pytestmark = pytest.mark.django_db


@pytest.fixture
def gpu(make_device, make_backend):
    device = make_device()
    return device, make_backend(device, models={"m": {"load_mb": 0, "request_mb": 1000}}), \
        make_backend(make_device("gpu1"), name="b1", models={"m": {"load_mb": 0, "request_mb": 1000}})


@pytest.fixture
def agent(queue_key, key_client):
    return key_client(queue_key[1])


def person(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def submit(agent, tmp_path, **body):
    body = {"kind": "custom", "model": "m", "backend": "b0", "input": {"path": str(tmp_path / "done"), "tag": "t"},
            **body}
    return agent.post("/api/v1/queue/tasks", body, format="json")


def test_an_agent_submits_and_reads_its_task_with_its_position(gpu, agent, tmp_path):
    first = submit(agent, tmp_path)
    assert first.status_code == 201, first.content
    second = submit(agent, tmp_path).json()
    assert first.json()["state"] == "queued" and first.json()["position"] == 1 and second["position"] == 2
    assert first.json()["history"][0]["event"] == "submitted"
    assert first.json()["requested_by"] == "key agent" and first.json()["memory_mb"] == 1000
    read = agent.get(f"/api/v1/queue/tasks/{second['id']}").json()
    assert read["position"] == 2 and read["device"] == "gpu0"
    listed = agent.get("/api/v1/queue/tasks").json()["results"]
    assert [t["id"] for t in listed] == [second["id"], first.json()["id"]]


def test_submitting_again_with_an_idempotency_key_answers_the_same_task(gpu, agent, tmp_path):
    one = agent.post("/api/v1/queue/tasks", {"kind": "chat", "model": "m"}, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    two = agent.post("/api/v1/queue/tasks", {"kind": "chat", "model": "m"}, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert (one.status_code, two.status_code) == (201, 200) and one.json()["id"] == two.json()["id"]
    other = agent.post("/api/v1/queue/tasks", {"kind": "chat", "model": "m", "priority": 3}, format="json",
                       HTTP_IDEMPOTENCY_KEY="k1")
    assert other.status_code == 409 and other.json()["error_code"] == "idempotency_conflict"
    assert QueueTask.objects.count() == 1


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"kind": "video"}, 400, "invalid_request", "kind"),
    ({"model": ""}, 400, "invalid_request", "model"),
    ({"priority": 101}, 400, "invalid_request", "priority"),
    ({"input": [1, 2]}, 400, "invalid_request", "input"),
    ({"memory_mb": -1}, 400, "invalid_request", "memory_mb"),
    ({"model": "gpt-9"}, 422, "model_not_served", "model"),
    ({"backend": "nope"}, 400, "invalid_request", "backend"),
    ({"memory_mb": 10_001}, 422, "exceeds_device", "memory_mb"),
])
def test_bad_submissions_are_named_and_store_nothing(gpu, agent, tmp_path, body, status, code, field):
    resp = submit(agent, tmp_path, **body)
    assert resp.status_code == status, resp.content
    details = resp.json()["details"]
    assert resp.json()["error_code"] == code and (details.get("field") == field or field in details["fields"])
    assert QueueTask.objects.count() == 0


def test_other_projects_and_outsiders_see_no_task(gpu, agent, tmp_path, make_key, other_project, charlie, key_client):
    task = submit(agent, tmp_path).json()
    stranger = key_client(make_key(other_project, scopes=["queue", "read"])[1])
    assert stranger.get(f"/api/v1/queue/tasks/{task['id']}").status_code == 404
    assert stranger.get("/api/v1/queue/tasks").json()["results"] == []
    assert person(charlie).get(f"/api/v1/queue/tasks/{task['id']}").status_code == 404
    assert person(charlie).get("/api/v1/projects/acme/queue").status_code == 404


def test_the_queue_state_shows_memory_depth_and_controls(gpu, agent, tmp_path, bob, olga):
    device, _, _ = gpu
    for _ in range(3):
        submit(agent, tmp_path)
    dispatcher.dispatch_device(device.pk)  # the first: its model loads (0 MiB), one at a time
    state = person(bob).get("/api/v1/projects/acme/queue").json()
    gpu0 = next(d for d in state["devices"] if d["name"] == "gpu0")
    assert (gpu0["held_mb"], gpu0["free_mb"], gpu0["live_free_mb"], gpu0["paused"]) == (1000, 9000, None, False)
    assert state["depth"] == 2 and state["paused"] is False
    b0 = next(b for b in state["backends"] if b["name"] == "b0")
    assert (b0["queued"], b0["admitted"], b0["running"]) == (2, 1, 0)
    person(olga).post("/api/v1/projects/acme/queue/controls", {"device": "gpu0", "paused": True, "reason": "swap"},
                      format="json")
    state = person(bob).get("/api/v1/projects/acme/queue").json()
    assert next(d for d in state["devices"] if d["name"] == "gpu0")["paused"] is True
    assert next(b for b in state["backends"] if b["name"] == "b0")["paused"] is True


def test_operators_steer_and_each_action_is_audited_with_who_and_why(gpu, agent, tmp_path, olga):
    device, _, b1 = gpu
    ops = person(olga)
    a, b, c = (submit(agent, tmp_path).json() for _ in range(3))
    resp = ops.post("/api/v1/projects/acme/queue/controls", {"paused": True, "reason": "deploy"}, format="json")
    assert resp.status_code == 200 and resp.json()["target"] == "queue" and resp.json()["paused"] is True
    resp = ops.post("/api/v1/projects/acme/queue/controls", {"backend": "b0", "throttle_ms": 500, "reason": "hot"},
                    format="json")
    assert resp.json()["throttle_ms"] == 500
    resp = ops.post(f"/api/v1/queue/tasks/{c['id']}/priority", {"priority": 9, "reason": "vip"}, format="json")
    assert resp.status_code == 200 and resp.json()["priority"] == 9 and resp.json()["position"] == 1
    resp = ops.post(f"/api/v1/queue/tasks/{b['id']}/redirect", {"backend": "b1", "reason": "balance"}, format="json")
    assert resp.status_code == 200 and (resp.json()["backend"], resp.json()["device"]) == ("b1", "gpu1")
    resp = ops.post(f"/api/v1/queue/tasks/{a['id']}/cancel", {"reason": "duplicate"}, format="json")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    again = ops.post(f"/api/v1/queue/tasks/{a['id']}/cancel", {}, format="json")
    assert again.status_code == 409 and again.json()["error_code"] == "task_closed"
    events = {e.action: e for e in AuditEvent.objects.filter(action__startswith="scheduler.task_")}
    assert set(events) == {"scheduler.task_cancelled", "scheduler.task_redirected", "scheduler.task_reprioritised"}
    assert {e.actor_repr for e in events.values()} == {"olga"}
    assert events["scheduler.task_cancelled"].after["reason"] == "duplicate"
    assert events["scheduler.task_redirected"].after["backend"] == "b1"
    assert AuditEvent.objects.filter(action="scheduler.control_set").count() == 2
    assert Control.objects.get(device__isnull=True, backend__isnull=True).paused


def test_agents_and_auditors_never_steer(gpu, agent, tmp_path, bob, make_key, key_client):
    task = submit(agent, tmp_path).json()
    admin_key = key_client(make_key(gpu[0].project, scopes=["queue", "read", "ingest", "budget", "approvals"])[1])
    for client, code in ((agent, "person_only"), (admin_key, "person_only"), (person(bob), "permission_denied")):
        for path, body in ((f"/api/v1/queue/tasks/{task['id']}/cancel", {}),
                           (f"/api/v1/queue/tasks/{task['id']}/redirect", {"backend": "b1"}),
                           (f"/api/v1/queue/tasks/{task['id']}/priority", {"priority": 5}),
                           ("/api/v1/projects/acme/queue/controls", {"paused": True})):
            resp = client.post(path, body, format="json")
            assert resp.status_code == 403 and resp.json()["error_code"] == code, (path, resp.content)
    assert QueueTask.objects.get().state == "queued" and not Control.objects.exists()


def test_a_control_names_a_device_or_a_backend_of_the_project(gpu, olga):
    ops = person(olga)
    for body, field in (({"device": "nope", "paused": True}, "device"), ({"backend": "nope", "paused": True}, "backend"),
                        ({"reason": "?"}, "paused"), ({"throttle_ms": 100}, "throttle_ms"),
                        ({"device": "gpu0", "throttle_ms": -1}, "throttle_ms")):
        resp = ops.post("/api/v1/projects/acme/queue/controls", body, format="json")
        details = resp.json()["details"]
        assert resp.status_code == 400 and (details.get("field") == field or field in details["fields"]), body


def test_without_an_asgi_server_a_wait_is_answered_at_once(gpu, agent, tmp_path):
    task = submit(agent, tmp_path).json()
    assert agent.get(f"/api/v1/queue/tasks/{task['id']}?wait=5").json()["state"] == "queued"
    resp = agent.get(f"/api/v1/queue/tasks/{task['id']}?wait=99")
    assert resp.status_code == 400 and resp.json()["details"]["field"] == "wait"


@pytest.mark.django_db(transaction=True)
def test_an_agent_waits_for_its_task_to_end_by_long_poll_and_by_socket(gpu, queue_key, tmp_path):
    if connection.vendor == "sqlite":  # the socket's reads run beside the worker's writes, on threads
        pytest.skip("reads and writes on threads collide on SQLite's shared in-memory test database")
    device, _, _ = gpu
    _, raw = queue_key
    auth = [(b"authorization", f"Bearer {raw}".encode())]
    first = services.submit(project=device.project, key=queue_key[0], kind="custom", model="m", backend="b0",
                            task_input={"path": str(tmp_path / "done"), "tag": "a"}).task
    second = services.submit(project=device.project, key=queue_key[0], kind="custom", model="m", backend="b0",
                             task_input={"path": str(tmp_path / "done"), "tag": "b"}).task

    def run_it(task):
        dispatcher.dispatch_device(device.pk)
        task.refresh_from_db()
        return executor.run(task.pk, task.generation)

    async def body():
        ws = WebsocketCommunicator(application, f"/ws/queue/tasks/{second.public_id}", headers=auth)
        assert (await ws.connect(timeout=5))[0]
        assert (await ws.receive_json_from(timeout=5))["state"] == "queued"
        poll = HttpCommunicator(application, "GET", f"/api/v1/queue/tasks/{first.public_id}?wait=20", headers=auth)
        answer = asyncio.ensure_future(poll.get_response(timeout=25))
        await asyncio.sleep(0.5)  # the long-poll is waiting
        assert not answer.done()
        started = time.monotonic()
        await database_sync_to_async(run_it)(first)
        response = await answer
        assert time.monotonic() - started < 10  # woken by the task's end, not by the wait's
        assert response["status"] == 200 and json.loads(response["body"])["state"] == "succeeded"
        await database_sync_to_async(run_it)(second)
        seen = [(await ws.receive_json_from(timeout=5))["state"]]
        while seen[-1] != "succeeded":  # nudges that find the task further on send it as it is then
            assert len(seen) < 4, seen
            seen.append((await ws.receive_json_from(timeout=5))["state"])
        assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 1000}

    async_to_sync(body)()


@pytest.mark.django_db(transaction=True)
def test_the_wait_refuses_what_the_api_refuses(gpu, queue_key, make_key, other_project):
    device, _, _ = gpu
    task = services.submit(project=device.project, key=queue_key[0], kind="custom", model="m").task
    _, stranger = make_key(other_project, scopes=["queue"])
    _, reader = make_key(device.project, scopes=["read"])

    async def status(raw):
        headers = [(b"authorization", f"Bearer {raw}".encode())] if raw else []
        poll = HttpCommunicator(application, "GET", f"/api/v1/queue/tasks/{task.public_id}?wait=1", headers=headers)
        response = await poll.get_response(timeout=5)
        return response["status"], json.loads(response["body"])["error_code"]

    async def body():
        assert await status(None) == (401, "not_authenticated")
        assert await status(stranger) == (404, "not_found")
        assert await status(reader) == (403, "missing_scope")

    async_to_sync(body)()
