"""Approvals on the pages, with requests made over the real API: the inbox lists what waits (oldest first,
overdue marked), with approve and reject for those whose role allows it and read-only for the others
(the requester included); an approval's page shows its arguments (redacted) and its decisions; the
history filters; the overview's tile counts what waits; a run's page lists its approvals; the inbox's
channel nudges on every change of a visible project's approval and of nobody else's. In a fixed number
of queries."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.approvals import services
from apps.approvals.models import Approval
from tests.approvals.conftest import ARGS
from tests.dashboard.test_live_channels import _messages, _open, run_async

pytestmark = pytest.mark.django_db


def _page(user, url, **params) -> str:
    client = Client()
    client.force_login(user)
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _row(page: str, approval_id: str) -> str:
    match = re.search(rf'<tr [^>]*data-approval="{re.escape(approval_id)}".*?</tr>', page, re.S)
    assert match, f"no row for {approval_id}"
    return match.group(0)


def test_the_inbox_shows_what_waits_with_buttons_for_those_allowed(ask, dave, bob, alice, charlie):
    first = ask(run_id="run-a", end_user="customer-1", estimated_cost_usd="12.5")
    mine = ask(action="send_email", end_user="dave")  # dave is the end user: he may not decide it
    page = _page(dave, "/approvals/")
    row = _row(page, first["id"])
    assert "payments.refund" in row and "Refund order 1234" in row and 'href="/runs/acme/run-a/"' in row
    assert 'data-decide="approve"' in row and 'data-decide="reject"' in row
    assert "customer@example.com" not in row  # the arguments are shown redacted
    assert 'data-decide="approve"' not in _row(page, mine["id"]) and "read only" in _row(page, mine["id"])
    assert page.index(first["id"]) < page.index(mine["id"])  # oldest first
    auditor = _page(bob, "/approvals/")
    assert 'data-decide="approve"' not in _row(auditor, first["id"])  # an auditor reads only
    assert 'data-decide="approve"' not in _row(_page(alice, "/approvals/"), first["id"])  # the key's owner
    assert first["id"] not in _page(charlie, "/approvals/")  # an outsider sees none of it


def test_an_overdue_request_is_marked(ask, dave, client_for, alice):
    client_for(alice).post("/api/v1/projects/acme/approval-rules", {"name": "slow", "overdue_seconds": 60},
                           format="json")
    got = ask()
    Approval.objects.filter(public_id=got["id"]).update(overdue_at=timezone.now() - timedelta(seconds=1))
    row = _row(_page(dave, "/approvals/"), got["id"])
    assert 'class="overdue"' in row and "overdue" in row


def test_the_approval_page_shows_its_arguments_and_decisions(ask, dave, charlie, client_for, bob):
    got = ask(arguments={**ARGS, "note": "call me at +1 415 555 0100"})
    client_for(dave).post(f"/api/v1/approvals/{got['id']}/approve", {"reason": "verified"}, format="json")
    page = _page(bob, f"/approvals/acme/{got['id']}/")
    assert got["action_hash"] in page and "dave (approver) approved" in page and "verified" in page
    assert "+1 415 555 0100" not in page and "&quot;amount&quot;: 120" in page
    client = Client()
    client.force_login(charlie)
    assert client.get(f"/approvals/acme/{got['id']}/").status_code == 404
    assert Client().get(f"/approvals/acme/{got['id']}/").status_code == 302  # signed out: the login page


def test_the_history_filters_by_state_and_action(ask, dave, client_for):
    approved, rejected = ask(), ask(action="send_email")
    client_for(dave).post(f"/api/v1/approvals/{approved['id']}/approve", {}, format="json")
    client_for(dave).post(f"/api/v1/approvals/{rejected['id']}/reject", {"reason": "no"}, format="json")
    page = _page(dave, "/approvals/", state="rejected")
    history = page[page.index('id="history"'):]
    assert rejected["id"] in history and approved["id"] not in history
    history = _page(dave, "/approvals/", action="payments.")[page.index('id="history"'):]
    assert approved["id"] in history and rejected["id"] not in history


def test_the_overview_tile_and_the_run_page(ask, dave, bob, agent):
    agent.post("/api/v1/runs", {"run_id": "run-t", "started_at": timezone.now().isoformat()}, format="json")
    from tests.traces.helpers import drain

    ask(run_id="run-t")
    ask(action="send_email")
    drain()
    overview = _page(bob, "/")
    tile = re.search(r'<section class="tile" data-tile="approvals">.*?</section>', overview, re.S).group(0)
    assert '<span data-figure="approvals-pending">2</span>' in tile and "payments.refund" in tile
    run_page = _page(bob, "/runs/acme/run-t/")
    assert 'data-run="approvals"' in run_page and "payments.refund" in run_page


def test_the_inbox_reads_a_fixed_number_of_queries(ask, dave, client_for):
    def queries() -> int:
        client = Client()
        client.force_login(dave)
        with CaptureQueriesContext(connection) as ctx:
            assert client.get("/approvals/").status_code == 200
        return len(ctx.captured_queries)

    ask()
    client_for(dave).post(f"/api/v1/approvals/{ask(action='send_email')['id']}/reject", {}, format="json")
    few = queries()
    for i in range(6):
        got = ask(action=f"send_email.{i}")
        if i % 2:
            client_for(dave).post(f"/api/v1/approvals/{got['id']}/reject", {}, format="json")
    assert queries() == few


@pytest.mark.django_db(transaction=True)
def test_the_inbox_channel_nudges_on_every_change_of_a_visible_projects_approval(dave, agent_key, make_key,
                                                                                  other_project):
    other_key = make_key(other_project, scopes=["approvals"])[0]

    async def body():
        ws, connected, _ = await _open("/ws/inbox/", dave)
        assert connected
        await database_sync_to_async(services.approval_request)(key=other_key, action="x", arguments={})
        assert await _messages(ws) == []  # another project's: nothing
        got = await database_sync_to_async(services.approval_request)(key=agent_key[0], action="x", arguments={})
        assert await _messages(ws) == [{"type": "changed", "approval": "pending"}]
        await database_sync_to_async(lambda: services.decide(approval=Approval.objects.get(pk=got.approval.pk),
                                                             user=dave, outcome="reject"))()
        assert await _messages(ws) == [{"type": "changed", "approval": "rejected"}]
        await ws.disconnect()

    run_async(body)
