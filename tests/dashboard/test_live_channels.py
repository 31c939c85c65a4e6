"""The pages' WebSocket channels against the real consumers and the configured channel layer: a
person receives the changes of the runs they may see, rendered as the page renders them, and
nothing of another project; every message is re-checked, so a revoked role stops them at once."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from apps.dashboard.routing import websocket_urlpatterns
from apps.projects import services as project_services
from apps.projects.models import Role
from apps.traces import records
from tests.traces.helpers import accept, drain

pytestmark = pytest.mark.django_db(transaction=True)
APP = URLRouter(websocket_urlpatterns)


def _send(project, key, run_id, *, agent="support-bot", finish=None, spans=()):
    recs = [records.run_start_record({"run_id": run_id, "agent": agent}, received_at=records.now_iso())]
    recs += [records.span_record(run_id, s, received_at=records.now_iso()) for s in spans]
    if finish:
        recs.append(records.run_finish_record(run_id, {"status": finish}, received_at=records.now_iso()))
    accept(project, key, recs)
    drain()


async def _open(path, user):
    communicator = WebsocketCommunicator(APP, path)
    communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=5)
    # A refusal is an accept followed at once by a close with its code (see LiveConsumer.refuse).
    if connected and not await communicator.receive_nothing(timeout=0.2):
        message = await communicator.receive_output()
        if message["type"] == "websocket.close":
            return communicator, False, message["code"]
    return communicator, connected, code


async def _messages(communicator, *, settle=0.6) -> list[dict]:
    out = []
    # receive_nothing waits without cancelling the consumer (a timed-out receive would).
    while not await communicator.receive_nothing(timeout=settle):
        out.append(await communicator.receive_json_from())
    return out


def run_async(fn):
    return async_to_sync(fn)()


def test_a_person_gets_rows_of_their_projects_runs_and_nothing_of_others(project, other_project, bob, make_key):
    key, other_key = make_key(project)[0], make_key(other_project)[0]

    async def body():
        ws, connected, _ = await _open("/ws/runs/", bob)
        assert connected
        await database_sync_to_async(_send)(project, key, "r-1", finish="failed")
        await database_sync_to_async(_send)(other_project, other_key, "g-1")
        got = await _messages(ws)
        await ws.disconnect()
        return got

    got = run_async(body)
    assert got and all(m["type"] == "row" for m in got)
    assert any("r-1" in m["html"] and "status-failed" in m["html"] for m in got)
    assert not any("g-1" in m["html"] for m in got)


def test_a_filtered_list_gets_matching_runs_as_rows_and_others_as_removals(project, bob, make_key):
    key = make_key(project)[0]

    async def body():
        ws, connected, _ = await _open("/ws/runs/?agent=billing-bot&status=failed", bob)
        assert connected
        await database_sync_to_async(_send)(project, key, "match", agent="billing-bot", finish="failed")
        await database_sync_to_async(_send)(project, key, "other", agent="support-bot", finish="failed")
        got = await _messages(ws)
        await ws.disconnect()
        return got

    got = run_async(body)
    rows = [m for m in got if m["type"] == "row"]
    assert rows and all("match" in m["html"] for m in rows)
    assert any(m["type"] == "remove" for m in got)


def test_invalid_filters_close_the_channel(project, bob):
    async def body():
        return await _open("/ws/runs/?status=exploded", bob)

    _, connected, code = run_async(body)
    assert not connected and code == 4400


def test_a_run_channel_is_refused_for_what_the_person_cannot_see(project, other_project, bob, charlie, make_key):
    _send(project, make_key(project)[0], "r-1")
    _send(other_project, make_key(other_project)[0], "g-1")

    async def body():
        results = {}
        for name, path, user in (("other project", "/ws/runs/globex/g-1/", bob), ("outsider", "/ws/runs/acme/r-1/", charlie),
                                 ("anonymous", "/ws/runs/acme/r-1/", AnonymousUser()),
                                 ("missing", "/ws/runs/acme/nope/", bob), ("own", "/ws/runs/acme/r-1/", bob)):
            ws, connected, code = await _open(path, user)
            results[name] = (connected, code)
            if connected:
                await ws.disconnect()
        return results

    results = run_async(body)
    assert results["other project"] == (False, 4404) and results["outsider"] == (False, 4404)
    assert results["missing"] == (False, 4404) and results["anonymous"] == (False, 4403)
    assert results["own"][0] is True


def test_a_run_page_is_nudged_when_its_spans_or_its_child_runs_move(project, bob, make_key):
    key = make_key(project)[0]
    _send(project, key, "parent")

    async def body():
        ws, connected, _ = await _open("/ws/runs/acme/parent/", bob)
        assert connected
        await database_sync_to_async(_send)(project, key, "parent", spans=[{"span_id": "s1", "kind": "tool",
                                                                           "tool": {"name": "t"}}])
        first = await _messages(ws)
        child = records.run_start_record({"run_id": "child", "parent_run_id": "parent"}, received_at=records.now_iso())
        await database_sync_to_async(lambda: (accept(project, key, [child]), drain()))()
        second = await _messages(ws)
        await ws.disconnect()
        return first, second

    first, second = run_async(body)
    assert any(m["type"] == "changed" and "s1" in m["new_spans"] for m in first)
    assert any(m["type"] == "changed" for m in second)


def test_a_revoked_role_stops_the_messages_at_once(project, alice, bob, make_key):
    key = make_key(project)[0]

    async def body():
        ws, connected, _ = await _open("/ws/runs/", bob)
        assert connected
        await database_sync_to_async(_send)(project, key, "before")
        before = await _messages(ws)
        await database_sync_to_async(project_services.role_revoke)(project=project, user=bob, role=Role.AUDITOR,
                                                                   actor=alice)
        await database_sync_to_async(_send)(project, key, "after")
        after = await _messages(ws)
        await ws.disconnect()
        return before, after

    before, after = run_async(body)
    assert before and after == []


def test_the_evals_page_is_nudged_when_a_batch_of_its_projects_moves_and_not_for_others(
        project, other_project, bob, alice, settings):
    from apps.evals import jobs

    settings.EVALS_JOB_CHUNK = 1
    settings.EVALS_JOB_LANES = 1
    key = make_key_for(project)
    for n in range(2):
        _send(project, key, f"r{n}", finish="completed")
    mine = jobs.job_create(project=project, actor=alice, name="nightly", evaluators=[{"name": "run_succeeded"}])
    theirs = jobs.job_create(project=other_project, actor=None, name="theirs", evaluators=[{"name": "run_succeeded"}])

    async def body():
        ws, connected, _ = await _open("/ws/evals/", bob)
        assert connected
        batch = await database_sync_to_async(jobs.job_start)(job=mine, trigger="schedule")
        other = await database_sync_to_async(jobs.job_start)(job=theirs, trigger="schedule")
        lane = database_sync_to_async(lambda b: b.lane_set.get().pk)
        await database_sync_to_async(jobs.job_chunk_step)(lane_pk=await lane(other))  # another project's: no message
        await database_sync_to_async(jobs.job_chunk_step)(lane_pk=await lane(batch))
        await database_sync_to_async(jobs.job_chunk_step)(lane_pk=await lane(batch))
        got = await _messages(ws)
        await ws.disconnect()
        return got

    assert run_async(body) == [{"type": "changed", "state": "running"}, {"type": "changed", "state": "succeeded"}]


def make_key_for(project):
    from apps.projects import services

    return services.api_key_create(project=project, name="live", scopes=["ingest", "read"], actor=None)[0]
