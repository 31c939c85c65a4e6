"""Costs on the pages, read through Django's test client, with spend made by the real pipeline (records
accepted, projected, priced): the costs page (chart, tables, drill-down links, spikes, unpriced calls)
scoped to the person's projects, a run's cost in the runs list and on its page (per span, with how it
was priced), a session's turns, the agents page and the overview's tiles; a fixed number of queries."""
from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from html import unescape
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from apps.budgets.models import CostSpike
from apps.dashboard.templatetags.dashboard import usd
from apps.traces import records
from tests.traces.helpers import accept, drain

pytestmark = pytest.mark.django_db

GPT = {"provider": "openai", "model": "gpt-4o"}
CLAUDE = {"provider": "anthropic", "model": "claude-sonnet-4-20250514"}
ACME_LLM = {"provider": "acme", "model": "acme-7b"}  # no price known
# Half an hour ago, but today (UTC): the spend is today's on the overview's tile whenever this runs.
T0 = max(timezone.now() - timedelta(minutes=30),
         timezone.now().replace(hour=0, minute=0, second=0, microsecond=0))


def _t(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def _llm(span_id: str, usage: dict, *, at: float = 1, **kw) -> dict:
    return {"span_id": span_id, "kind": "llm", "name": "chat", "start_time": _t(at), "end_time": _t(at + 1),
            "usage": usage, **kw}


def _run(project, key, run_id, spans, *, agent="support", version="1.0", end_user="u-1", **kw):
    recs = [records.run_start_record({"run_id": run_id, "agent": {"name": agent, "version": version},
                                      "end_user": end_user, "started_at": _t(0), **kw}, received_at=_t(0))]
    recs += [records.span_record(run_id, s, received_at=_t(1)) for s in spans]
    recs.append(records.run_finish_record(run_id, {"status": "completed", "ended_at": _t(20)}, received_at=_t(20)))
    accept(project, key, recs)


@pytest.fixture
def seeded(project, other_project, make_key):
    """acme: r1 (support, u-1: gpt-4o $0.029, claude $0.0525, an unpriced acme-7b call, a tool call),
    r2 (triage, u-2: gpt-4o $2.50, reported $0.05 for $0.029 of tokens: "disagrees"), both turns of
    session chat-1, and r1's child run (gpt-4o $1); globex: its own spend ($10), which acme's people
    never see."""
    key = make_key(project)[0]
    _run(project, key, "r1", [
        _llm("a", {"input_tokens": 12_000, "cache_read_tokens": 8_000, "output_tokens": 900}, **GPT),
        _llm("b", {"input_tokens": 10_000, "cache_write_tokens": 10_000, "output_tokens": 1_000}, at=3, **CLAUDE),
        _llm("x", {"input_tokens": 500, "output_tokens": 20}, at=5, **ACME_LLM),
        {"span_id": "t", "kind": "tool", "name": "lookup", "tool": {"name": "lookup"}, "start_time": _t(7),
         "end_time": _t(8)}], session_id="chat-1")
    _run(project, key, "r2", [
        _llm("big", {"input_tokens": 1_000_000}, **GPT),
        _llm("rep", {"input_tokens": 12_000, "cache_read_tokens": 8_000, "output_tokens": 900}, at=3,
             cost_usd="0.05", **GPT)], agent="triage", end_user="u-2", session_id="chat-1")
    _run(project, key, "child", [_llm("c", {"input_tokens": 400_000}, **GPT)], parent_run_id="r1")
    _run(other_project, make_key(other_project)[0], "g1", [
        _llm("g", {"input_tokens": 4_000_000}, provider="openai", model="gpt-4o")],
         agent="globex-secret-bot", end_user="globex-user")
    drain()
    return key


def _page(client, url="/costs/", **params) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _links(page: str) -> list[str]:
    return [unescape(h) for h in re.findall(r'href="([^"]+)"', page)]


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_the_usd_filter_reads_like_a_bill():
    assert [usd(v) for v in (None, Decimal(0), Decimal("0.0815"), Decimal("0.029"), Decimal("2.5"),
                             Decimal("1234.567"), Decimal("0.000012"), Decimal("0.00123456"))] == [
        "—", "$0.00", "$0.0815", "$0.0290", "$2.50", "$1,234.57", "$0.000012", "$0.001235"]


def test_an_auditor_sees_the_project_s_spend_by_day_agent_user_model_and_provider(client, bob, seeded):
    client.force_login(bob)
    page = _page(client)
    # acme: 0.029 + 0.0525 + 2.5 + 0.05 (reported) + 1 (the child run) = $3.6315
    assert 'data-field="total">$3.63<' in page
    assert 'svg class="daybars"' in page and page.count("<a href=\"/runs/?") >= 30  # a bar per day, each a link
    for name in ("support", "triage", "u-1", "u-2", "gpt-4o", "claude-sonnet-4-20250514", "openai", "anthropic"):
        assert f">{name}</a>" in page, name
    assert "globex" not in page and "globex-secret-bot" not in page and "globex-user" not in page
    agents = page[page.index('data-costs="agent"'):page.index('data-costs="end_user"')]
    assert agents.index("triage") < agents.index("support")  # the most expensive first
    assert "$2.55" in agents and "$1.08" in agents  # triage 2.5 + 0.05; support 0.029 + 0.0525 + the child 1


def test_each_row_and_day_drills_down_into_its_runs(client, bob, seeded):
    client.force_login(bob)
    page = _page(client)
    today = timezone.now().date()
    since = today - timedelta(days=29)
    links = [_query(u) for u in _links(page) if u.startswith("/runs/?")]
    expected_range = {"started_after": f"{since} 00:00", "started_before": f"{today + timedelta(days=1)} 00:00"}
    for dims in ({"agent": "triage"}, {"end_user": "u-2"}, {"model": "gpt-4o", "provider": "openai"},
                 {"provider": "anthropic"}):
        assert {"project": "acme", **dims, **expected_range} in links, dims
    assert {"project": "acme", "started_after": f"{today} 00:00",
            "started_before": f"{today + timedelta(days=1)} 00:00"} in links  # today's bar
    # A drill-down link lists the runs behind the row.
    runs = client.get("/runs/", {"project": "acme", "agent": "triage", **expected_range}).content.decode()
    assert "r2" in runs and ">r1<" not in runs
    runs = client.get("/runs/", {"project": "acme", "model": "claude-sonnet-4-20250514", **expected_range})
    assert ">r1<" in runs.content.decode() and ">r2<" not in runs.content.decode()


def test_unpriced_calls_are_listed_with_the_reason_and_a_link_to_add_a_price(client, bob, project, seeded):
    client.force_login(bob)
    page = _page(client)
    assert 'data-field="unpriced"><a class="warn" href="#unpriced">1 not counted</a>' in page
    row = re.search(r'<tr data-unpriced="acme/acme-7b">(.*?)</tr>', page, re.S).group(1)
    assert ">acme-7b</a>" in row and "acme" in row and "does not know acme/acme-7b" in row
    [add] = [u for u in _links(row) if u.startswith("/admin/budgets/priceoverride/add/")]
    assert _query(add) | {"effective_from": "-"} == {"project": str(project.pk), "provider": "acme",
                                                      "model_pattern": "acme-7b", "effective_from": "-"}


def test_spikes_are_listed_and_their_day_marked_on_the_chart(client, bob, project, seeded):
    today = timezone.now().date()
    CostSpike.objects.create(project=project, period="day", day=today, scope="agent", value="triage",
                             spend_nanos=2_550_000_000, baseline_nanos=100_000_000, factor=Decimal(3))
    client.force_login(bob)
    page = _page(client)
    spikes = page[page.index('data-costs="spikes"'):page.index('data-costs="unpriced"')]
    assert "agent triage" in spikes and "$2.55" in spikes and "$0.1000" in spikes and "×3" in spikes
    assert page.count('class="bar spike"') == 1 and f'data-day="{today}"' in page and "spike: agent triage" in page


def test_the_range_is_chosen_in_the_url_and_a_bad_one_is_explained(client, bob, seeded):
    client.force_login(bob)
    empty = _page(client, since="2020-01-01", until="2020-01-31")
    assert 'data-field="total">$0.00<' in empty and empty.count('data-day="2020-01-') == 31
    assert "No spend in this range." in empty
    bad = _page(client, since="2026-02-01", until="2026-01-01")
    assert 'role="alert"' in bad and "after" in bad and 'data-field="total">$3.63<' in bad  # the default range
    too_long = _page(client, since="2020-01-01", until="2026-01-01")
    assert "At most 366 days" in too_long
    for query in ({"since": "9999-12-31"}, {"until": "0001-01-01"}, {"since": "nope"}):
        assert client.get("/costs/", query).status_code == 200
    assert client.get("/costs/", {"project": "../x"}).status_code == 404


def test_another_project_s_people_see_nothing_of_it(client, charlie, seeded, django_user_model):
    from apps.projects import services
    from apps.projects.models import Project, Role

    client.force_login(charlie)
    page = _page(client)
    assert "$3.63" not in page and "support" not in page and "acme-7b" not in page and "no role in any project" in page
    globex_auditor = django_user_model.objects.create_user("gina", password="pw-gina")
    services.role_grant(project=Project.objects.get(slug="globex"), user=globex_auditor, role=Role.AUDITOR, actor=None)
    client.force_login(globex_auditor)
    page = _page(client)
    assert "globex-secret-bot" in page and "$10.00" in page  # 4M input tokens of gpt-4o
    for secret in ("triage", "u-1", "acme-7b", "claude", "$3.63"):
        assert secret not in page, secret
    assert "support" not in _page(client, project="acme")


def test_the_costs_page_asks_a_fixed_number_of_queries(client, bob, project, make_key, seeded,
                                                       django_assert_num_queries):
    key = make_key(project)[0]
    for i in range(12):
        _run(project, key, f"more-{i}", [_llm("m", {"input_tokens": 1000 * (i + 1)}, **GPT),
                                         _llm("n", {"input_tokens": 10}, model=f"unknown-{i}", provider="x")],
             agent=f"agent-{i}", end_user=f"user-{i}")
    drain()
    client.force_login(bob)
    # Session, user, access, visible projects; the projects' time zones, spend by day, by agent, by end
    # user, by model and provider, the spikes, the unpriced calls; the budgets (their periods and
    # thresholds crossed only where there are budgets), the holds (their totals, the oldest), the
    # thresholds crossed in the range: never a query per row.
    with django_assert_num_queries(15):
        page = _page(client)
    assert page.count("agent-") >= 12 and page.count('data-unpriced="x/unknown-') == 12


def test_the_runs_list_shows_each_run_s_own_cost(client, bob, seeded):
    client.force_login(bob)
    page = _page(client, "/runs/")
    cost = dict(re.findall(r'href="/runs/acme/([\w-]+)/".*?data-field="cost"[^>]*>([^<]*)<', page, re.S))
    assert cost == {"r1": "$0.0815", "r2": "$2.55", "child": "$1.00"}  # r1's child run is not in r1's cost
    assert ">Cost</th>" in page
    assert 'data-field="cost"' in client.get("/runs/?fragment=rows").content.decode()  # the live rows too


def test_the_run_page_shows_its_cost_its_children_s_and_each_span_s(client, bob, seeded):
    client.force_login(bob)
    page = _page(client, "/runs/acme/r1/")
    head = re.search(r'data-field="cost">(.*?)</dd>', page, re.S).group(1)
    assert "$0.0815" in head and "+ $1.00 in 1 child run" in head and "1 call unpriced" in head
    assert "disagree" not in head
    tree = page[page.index("data-tree"):page.index("</ul>", page.index("data-tree"))]
    a = re.search(r'<li data-span="a".*?</li>', tree, re.S).group(0)
    assert re.search(r'<span class="cost source-computed" title="computed · genai-prices [\d.]+ openai/gpt-4o">'
                     r'\$0.0290</span>', a), a
    assert 'class="cost unpriced" title="unpriced: genai-prices' in tree and "acme/acme-7b" in tree
    assert 'data-span="t"' in tree and tree.count('class="cost') == 3  # the tool call is no model call
    assert re.search(r'href="/runs/acme/child/".*?\$1.00', page, re.S)  # the child run with its cost

    r2 = _page(client, "/runs/acme/r2/")
    assert "1 reported cost disagrees with the tokens" in r2 and "child run" not in r2
    rep = re.search(r'<li data-span="rep".*?</li>', r2, re.S).group(0)
    assert "source-reported" in rep and "≠" in rep and "reported $0.0500, the tokens say $0.0290" in rep


def test_the_span_panel_shows_cost_source_price_and_a_disagreement(client, bob, seeded):
    client.force_login(bob)
    panel = _page(client, "/runs/acme/r1/spans/a/")
    assert re.search(r'data-field="span-cost"><span class="money">\$0.0290</span> <span class="cost-source '
                     r'source-computed" data-field="cost-source">computed</span></dd>', panel)
    assert re.search(r'data-field="price-ref">genai-prices [\d.]+ openai/gpt-4o<', panel)
    assert "disagrees" not in panel
    reported = _page(client, "/runs/acme/r2/spans/rep/")
    assert 'data-field="cost-source">reported<' in reported and 'data-field="disagrees">≠ disagrees<' in reported
    assert "reported $0.0500 · the tokens say $0.0290" in reported
    unpriced = _page(client, "/runs/acme/r1/spans/x/")
    assert '<span class="warn">unpriced</span>' in unpriced and "does not know acme/acme-7b" in unpriced
    tool = _page(client, "/runs/acme/r1/spans/t/")
    assert 'data-field="span-cost"' not in tool  # nothing to price


def test_the_session_page_shows_each_turn_s_cost_and_the_running_total(client, bob, seeded):
    client.force_login(bob)
    page = _page(client, "/sessions/acme/chat-1/")
    assert re.findall(r'data-field="turn-cost">([^<]*)<', page) == ["$0.0815", "$2.55"]
    assert re.findall(r'<td class="num" data-field="session-cost">([^<]*)<', page) == ["$0.0815", "$2.63"]
    assert '<dd data-field="session-cost">$2.63</dd>' in page


def test_the_agents_page_shows_each_version_s_cost(client, bob, seeded):
    client.force_login(bob)
    page = _page(client, "/agents/")
    rows = re.findall(r'<tr[ >].*?</tr>', page[page.index('<table class="list agents">'):], re.S)
    costs = [(re.search(r'agent=(\w+)', r).group(1), re.search(r'data-field="cost">([^<]*)<', r).group(1))
             for r in rows[1:]]
    assert costs == [("support", "$1.08"), ("triage", "$2.55")]  # support 1.0 (with the child run), triage 1.0
    assert "$2.55 a run" in page and "$0.5408 a run" in page  # triage: one run; support: r1 and its child
    assert "1 unpriced" in page and "globex" not in page


def test_the_overview_tiles_show_spend_today_spikes_and_unpriced_models(client, bob, project, seeded):
    CostSpike.objects.create(project=project, period="hour", day=timezone.now().date(), hour=3, scope="agent",
                             value="triage", spend_nanos=2_550_000_000, baseline_nanos=1, factor=Decimal(3))
    client.force_login(bob)
    page = _page(client, "/")
    spend = page[page.index('data-tile="spend"'):page.index('data-tile="spikes"')]
    assert 'data-figure="spend-today">$3.63<' in spend and 'class="spark"' in spend and 'href="/costs/?"' in spend
    spikes = page[page.index('data-tile="spikes"'):page.index('data-tile="unpriced"')]
    assert "03:00 · triage" in spikes and "$2.55" in spikes
    unpriced = page[page.index('data-tile="unpriced"'):]
    assert 'data-figure="unpriced">1<' in unpriced and "acme/acme-7b" in unpriced
    assert "$10.00" not in page and "globex" not in page
    narrowed = _page(client, "/", project="acme")
    assert 'data-figure="spend-today">$3.63<' in narrowed and 'href="/costs/?project=acme&amp;"' in narrowed


def test_run_pages_with_costs_ask_a_fixed_number_of_queries(client, bob, seeded, django_assert_num_queries):
    client.force_login(bob)
    # Session, user, access, visible projects; the run, its outline (three), its children, its tool
    # calls; the priced spans, its reservations (how many: none, so no list), its approvals, its scores,
    # and (a run with children only) the children's costs.
    with django_assert_num_queries(15):
        _page(client, "/runs/acme/r1/")
    with django_assert_num_queries(14):
        _page(client, "/runs/acme/r2/")
    with django_assert_num_queries(7):  # ... the run, the span, its updates, its price
        _page(client, "/runs/acme/r1/spans/a/")
    with django_assert_num_queries(6):  # the runs list: the page of runs, costs and scores on the row
        _page(client, "/runs/")
    # The overview: the runs' tiles, then spend by day, spikes, unpriced calls (and with a project, its
    # time zone for "today"), the budgets and the thresholds crossed, the approvals waiting (none: no list),
    # the regressions (one), the queue (what waits, what runs, what is paused, the devices).
    with django_assert_num_queries(24):
        _page(client, "/")
    with django_assert_num_queries(25):
        _page(client, "/", project="acme")


def test_a_person_seeing_several_projects_gets_each_row_s_project(client, seeded, django_user_model):
    root = django_user_model.objects.create_superuser("root", password="pw-root")
    client.force_login(root)
    page = _page(client)
    assert 'data-field="total">$13.63<' in page  # acme's $3.6315 and globex's $10
    agents = page[page.index('data-costs="agent"'):page.index('data-costs="end_user"')]
    assert re.search(r'>globex-secret-bot</a><div class="muted">globex</div>', agents)
    links = [_query(u) for u in _links(agents)]
    assert {"project": "globex", "agent": "globex-secret-bot"}.items() <= links[0].items()
    assert {"project": "acme", "agent": "triage"}.items() <= links[1].items()
    assert "project" not in _query(re.search(r'<a href="(/runs/\?[^"]+)" data-day', page).group(1).replace(
        "&amp;", "&"))  # a day of every project's spend
    narrowed = _page(client, project="globex")
    assert 'data-field="total">$10.00<' in narrowed and "triage" not in narrowed


def test_drill_downs_keep_the_project_s_own_days(client, alice, bob, project, make_key):
    from apps.projects import services as project_services

    project_services.project_update(project=project, actor=alice, time_zone="Asia/Tokyo")
    key = make_key(project)[0]
    _run(project, key, "tokyo", [_llm("a", {"input_tokens": 400_000}, **GPT)])
    drain()
    client.force_login(bob)
    page = _page(client)
    today = timezone.now().astimezone(ZoneInfo("Asia/Tokyo")).date()
    link = next(_query(u) for u in _links(page) if "agent=support" in u)
    since = today - timedelta(days=29)
    assert (link["started_after"], link["started_before"]) == (
        f"{since}T00:00:00+09:00", f"{today + timedelta(days=1)}T00:00:00+09:00")
    runs = client.get("/runs/", link).content.decode()
    assert ">tokyo<" in runs and 'role="alert"' not in runs
