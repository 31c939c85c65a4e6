"""Budgets on the pages, with spend made through the real call boundary (reservations over the API) and
the real ingest path: the costs page lists each budget's use in its period, the reservations held now
and the thresholds crossed; a run's page shows its reservations and refusals; the overview's tile shows
the budgets near or over their cap, and is nudged live when a threshold is crossed. Scoped to the
person's projects, in a fixed number of queries."""
from __future__ import annotations

import json
import re

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.budgets import services
from apps.budgets.models import Budget
from tests.dashboard.test_live_channels import _messages, _open, run_async
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db

USD = 10**9


def post(client, url, body=None):
    return client.post(url, data=json.dumps(body or {}), content_type="application/json")


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project, scopes=("budget", "ingest", "read"), name="support-bot")[1])


def _budget(project, actor, **fields) -> Budget:
    fields.setdefault("cap_nanos", 1 * USD)
    return services.budget_create(project=project, actor=actor, **fields)


def _reserve(client, cost: str, **body):
    return post(client, "/api/v1/budget/reservations", {"estimated_cost_usd": cost, **body})


def _settle(client, reservation_id: int, cost: str):
    r = post(client, f"/api/v1/budget/reservations/{reservation_id}/settle", {"cost_usd": cost})
    assert r.status_code == 200, r.content
    return r


def _page(client, url, **params) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _row(page: str, attr: str, value: str) -> str:
    match = re.search(rf'<tr [^>]*{attr}="{re.escape(value)}".*?</tr>', page, re.S)
    assert match, f"no row {attr}={value}"
    return match.group(0)


@pytest.fixture
def spent(project, other_project, alice, agent, make_key, key_client):
    """acme: "daily" (project, $1, 50 % / 90 %): $0.60 settled, $0.25 held (85 %: 50 % crossed, near);
    "triage" (agent triage, $0.10): $0.10 settled (over); "month" (a month, $100, soft): barely used.
    Run run-1 holds two reservations (one settled, one held) and a refusal by "triage". globex has a
    budget of its own acme's people never see."""
    _budget(project, alice, name="daily", thresholds=[50, 90])
    _budget(project, alice, name="triage", scope="agent", value="triage", cap_nanos=USD // 10)
    _budget(project, alice, name="month", period="month", cap_nanos=100 * USD, hard=False)
    first = _reserve(agent, "0.70", agent="support", run_id="run-1", model="gpt-4o").json()
    _settle(agent, first["id"], "0.50")
    held = _reserve(agent, "0.25", agent="support", run_id="run-1", model="gpt-4o")
    assert held.status_code == 201
    t = _reserve(agent, "0.10", agent="triage", run_id="run-2").json()
    _settle(agent, t["id"], "0.10")
    refused = _reserve(agent, "0.01", agent="triage", run_id="run-1", model="gpt-4o-mini")
    assert refused.status_code == 402
    # run-1 exists in the run log too (its page is the run's).
    assert post(agent, "/api/v1/runs", {"run_id": "run-1", "agent": "support"}).status_code == 202
    assert post(agent, "/api/v1/runs", {"run_id": "run-2", "agent": "triage"}).status_code == 202
    globex_key = make_key(other_project, scopes=("budget",))[1]
    services.budget_create(project=other_project, actor=None, name="globex-secret-cap", cap_nanos=USD)
    assert _reserve(key_client(globex_key), "0.99").status_code == 201
    drain()
    return held.json()


def test_the_costs_page_shows_each_budget_s_use_holds_and_thresholds_crossed(client, bob, spent):
    client.force_login(bob)
    page = _page(client, "/costs/")
    daily = _row(page, "data-budget", "daily")
    assert 'data-level="near"' in daily  # $0.60 spent and $0.25 held of $1: past 50 %, not past the cap
    assert 'data-field="spent">$0.6000<' in daily and 'data-field="held">$0.2500<' in daily
    assert 'data-field="left">$0.1500<' in daily and "85 %" in daily
    thresholds = re.search(r'data-field="thresholds">(.*?)</td>', daily, re.S).group(1)
    assert "50 % ✓" in thresholds and "90 % ✓" not in thresholds  # 50 % was crossed by spend, 90 % not yet
    assert 'data-level="over"' in _row(page, "data-budget", "triage")
    month = _row(page, "data-budget", "month")
    assert 'data-level="ok"' in month and "soft" in month
    # Most used first.
    assert page.index('data-budget="triage"') < page.index('data-budget="daily"') < page.index('data-budget="month"')
    held = _row(page, "data-reservation", str(spent["id"]))
    assert "$0.2500" in held and 'href="/runs/acme/run-1/"' in held
    assert "1 reservation, $0.2500 held" in page
    alerts = re.search(r'data-costs="alerts".*?</table>', page, re.S).group(0)
    assert 'data-alert="daily-50"' in alerts and 'data-alert="triage-' not in alerts  # triage has no thresholds
    assert "globex" not in page


def test_another_project_s_people_see_none_of_its_budgets(client, charlie, spent):
    client.force_login(charlie)
    page = _page(client, "/costs/")
    assert 'data-budget="' not in page and 'data-reservation="' not in page and "No budget" in page


def test_the_run_page_shows_its_reservations_and_the_refusal_naming_the_budget(client, bob, spent):
    client.force_login(bob)
    page = _page(client, "/runs/acme/run-1/")
    section = re.search(r'data-run="reservations".*?</section>', page, re.S).group(0)
    states = re.findall(r'data-state="(\w+)"', section)
    assert states == ["settled", "held", "refused"]
    assert "3 made before paid calls" in section and "1 refused" in section
    refused = re.search(r'data-state="refused".*?</tr>', section, re.S).group(0)
    assert "budget “triage” (cap $0.1000 a day)" in refused and "gpt-4o-mini" in refused
    settled = re.search(r'data-state="settled".*?</tr>', section, re.S).group(0)
    assert "$0.7000" in settled and "$0.5000" in settled  # held, then charged
    other = _page(client, "/runs/acme/run-2/")
    assert "1 made before paid calls" in other and "refused" not in other


def test_the_overview_tile_shows_budgets_near_or_over_their_cap(client, bob, spent):
    client.force_login(bob)
    page = _page(client, "/")
    tile = page[page.index('data-tile="budgets"'):]
    tile = tile[:tile.index("</section>")]
    assert 'data-figure="budgets-over" class="bad">1<' in tile and 'data-figure="budgets-near" class="warn">1<' in tile
    assert "of 3 budgets" in tile
    assert tile.index('data-budget="triage"') < tile.index('data-budget="daily"') and 'data-budget="month"' not in tile
    assert "100 % of $0.1000" in tile and "85 % of $1.00" in tile
    assert 'data-alert="daily-50"' in tile
    assert "globex" not in page


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        _page(client, url)
    return len(ctx.captured_queries)


def test_pages_with_budgets_ask_a_fixed_number_of_queries(client, bob, project, alice, agent, spent):
    client.force_login(bob)
    urls = ("/costs/", "/", "/runs/acme/run-1/")
    before = {url: _queries(client, url) for url in urls}
    for i in range(30):  # more budgets, more reservations held (past the 20 listed) and made on the run
        _budget(project, alice, name=f"more-{i}", scope="end_user", value=f"u-{i}", thresholds=[10])
        r = _reserve(agent, "0.001", end_user=f"u-{i}", run_id="run-1")
        assert r.status_code == 201, r.content
        if i % 3 == 0:
            _settle(agent, r.json()["id"], "0.001")
    page = _page(client, "/costs/")
    assert page.count('data-budget="more-') == 30 and page.count('data-reservation="') == 20  # the oldest 20 held
    assert "21 reservations, $0.2700 held" in page
    assert {url: _queries(client, url) for url in urls} == before


@pytest.mark.django_db(transaction=True)
def test_the_overview_is_nudged_live_when_a_threshold_is_crossed(project, other_project, alice, bob, agent):
    _budget(project, alice, name="daily", thresholds=[80])
    other = services.budget_create(project=other_project, actor=None, name="theirs", cap_nanos=USD, thresholds=[1])
    first = _reserve(agent, "0.50").json()

    def cross_theirs():
        from apps.budgets import ledger

        held = ledger.reserve(project_id=other_project.pk, api_key_id=0, amount=USD // 2)
        ledger.settle(held.reservation, actual=USD // 2)
        assert other.alerts.count() == 1

    async def body():
        ws, connected, _ = await _open("/ws/overview/", bob)
        assert connected
        await database_sync_to_async(cross_theirs)()
        quiet = await _messages(ws)  # another project's alert: nothing for bob
        await database_sync_to_async(_settle)(agent, first["id"], "0.90")  # 90 % of $1: crosses 80 %
        got = await _messages(ws)
        await ws.disconnect()
        return quiet, got

    quiet, got = run_async(body)
    assert quiet == []
    assert got == [{"type": "changed"}]
