"""An agent waiting on the WebSocket ``/ws/approvals/{id}`` (the application's real router, the configured
channel layer): the state at once, the decision when it is made, then the socket closes; keys only,
their own project's approvals only."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from apps.approvals import services
from apps.approvals.models import Approval
from controlplane.asgi import application
from tests.approvals.conftest import ARGS

pytestmark = pytest.mark.django_db(transaction=True)


async def _open(path: str, raw: str | None):
    headers = [(b"authorization", f"Bearer {raw}".encode())] if raw else []
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    return communicator


def test_the_agent_is_told_the_decision_and_the_socket_closes(agent_key, dave):
    key, raw = agent_key
    approval = services.approval_request(key=key, action="payments.refund", arguments=ARGS).approval

    async def body():
        ws = await _open(f"/ws/approvals/{approval.public_id}", raw)
        first = await ws.receive_json_from(timeout=5)
        assert first["state"] == "pending" and first["id"] == approval.public_id
        await database_sync_to_async(lambda: services.decide(approval=Approval.objects.get(pk=approval.pk),
                                                             user=dave, outcome="approve"))()
        decided = await ws.receive_json_from(timeout=5)
        assert decided["state"] == "approved" and decided["decisions"][0]["decider"] == "dave"
        closed = await ws.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 1000}

    async_to_sync(body)()


def test_the_socket_refuses_people_other_projects_and_keys_without_the_scope(agent_key, make_key, other_project,
                                                                             project):
    key, _ = agent_key
    approval = services.approval_request(key=key, action="payments.refund", arguments=ARGS).approval
    _, stranger = make_key(other_project, scopes=["approvals"])
    _, reader = make_key(project, scopes=["read"])

    async def refused(raw):
        ws = await _open(f"/ws/approvals/{approval.public_id}", raw)
        error = await ws.receive_json_from(timeout=5)
        closed = await ws.receive_output(timeout=5)
        return error["error_code"], closed["code"]

    async def body():
        assert await refused(None) == ("not_authenticated", 4401)
        assert await refused(stranger) == ("not_found", 4404)
        assert await refused(reader) == ("missing_scope", 4403)

    async_to_sync(body)()
