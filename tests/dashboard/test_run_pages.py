"""The overview, the runs list and a run's page, read through Django's test client: scoped to the
person's projects, filters kept in the URL, cursor pages, large values on demand, exports audited,
and a fixed number of queries per page."""
from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.traces import records
from tests.streaming import read_streamed
from tests.traces.helpers import accept, drain

pytestmark = pytest.mark.django_db


def _now(seconds: float = 0) -> str:
    return (timezone.now() - timedelta(minutes=10) + timedelta(seconds=seconds)).isoformat()


def _run(project, key, run_id, *, agent="support-bot", status="completed", spans=(), **kw):
    recs = [records.run_start_record({"run_id": run_id, "agent": agent, "started_at": _now(), **kw},
                                     received_at=_now())]
    for s in spans:
        recs.append(records.span_record(run_id, {"start_time": _now(1), **s}, received_at=_now(1)))
    if status:
        body = {"status": status, "ended_at": _now(5)}
        if status == "failed":
            body["error_code"] = "tool_timeout"
        recs.append(records.run_finish_record(run_id, body, received_at=_now(5)))
    accept(project, key, recs)


@pytest.fixture
def seeded(project, other_project, make_key):
    key = make_key(project)[0]
    other_key = make_key(other_project)[0]
    _run(project, key, "r-ok", spans=[
        {"span_id": "llm-1", "kind": "llm", "name": "chat", "model": "gpt-4o", "provider": "openai",
         "end_time": _now(2), "usage": {"input_tokens": 1000, "output_tokens": 50, "cache_read_tokens": 800},
         "time_to_first_token_ms": 120},
        {"span_id": "tool-1", "parent_span_id": "llm-1", "kind": "tool", "name": "search", "end_time": _now(3),
         "tool": {"name": "search", "arguments": {"q": "weather in Paris"}, "result": {"temp": 21}}}])
    _run(project, key, "r-bad", agent="billing-bot", status="failed")
    _run(project, key, "r-live", status=None, spans=[{"span_id": "open-1", "kind": "tool", "name": "slow",
                                                       "tool": {"name": "slow"}}])
    _run(other_project, other_key, "g-secret", agent="globex-bot")
    drain()
    return key


def test_anonymous_people_are_sent_to_the_products_login_page(client):
    for url in ("/", "/runs/", "/runs/acme/r-ok/", "/runs/export.csv"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/?next="), url


def test_an_auditor_signs_in_on_the_login_page_without_being_staff(client, project, bob):
    assert not bob.is_staff
    page = client.get("/login/")
    assert page.status_code == 200 and b'name="password"' in page.content
    response = client.post("/login/", {"username": "bob", "password": "pw-bob", "next": "/runs/"})
    assert response.status_code == 302 and response["Location"] == "/runs/"
    assert client.get("/runs/").status_code == 200


def test_a_wrong_password_is_refused_with_a_message(client, project):
    response = client.post("/login/", {"username": "bob", "password": "nope"})
    assert response.status_code == 200 and b"did not match" in response.content


def test_the_overview_shows_the_projects_runs_and_failures_and_nothing_of_others(client, bob, seeded):
    client.force_login(bob)
    page = client.get("/").content.decode()
    assert "r-bad" in page and "tool_timeout" in page and "g-secret" not in page and "globex" not in page
    assert 'href="/runs/?since=24h&amp;status=failed&amp;status=lost"' in page  # a tile links to its list
    tiles = client.get("/?fragment=tiles")
    assert tiles.status_code == 200 and b"<html" not in tiles.content and b"r-bad" in tiles.content


def test_the_runs_list_filters_by_agent_and_status_through_the_url(client, bob, seeded):
    client.force_login(bob)
    page = client.get("/runs/").content.decode()
    assert all(r in page for r in ("r-ok", "r-bad", "r-live")) and "g-secret" not in page
    page = client.get("/runs/?agent=billing-bot&status=failed").content.decode()
    assert "r-bad" in page and "r-ok" not in page and "r-live" not in page
    assert 'value="billing-bot"' in page  # the filter form keeps what the URL says
    assert "/ws/runs/?agent=billing-bot&amp;status=failed" in page  # and so does the live channel


def test_invalid_filters_are_explained_not_a_server_error(client, bob, seeded):
    client.force_login(bob)
    response = client.get("/runs/?status=exploded&meta=novalue&started_after=yesterday")
    assert response.status_code == 200
    body = response.content.decode()
    assert 'role="alert"' in body and "exploded" in body and "key=value" in body


def test_cursor_pages_walk_every_run_once(client, bob, project, make_key):
    key = make_key(project)[0]
    for i in range(7):
        _run(project, key, f"p-{i}")
    drain()
    client.force_login(bob)
    seen, url = [], "/runs/"
    from apps.dashboard.views import runs as runs_view
    size, runs_view.PAGE_SIZE = runs_view.PAGE_SIZE, 3
    try:
        while url:
            response = client.get(url)
            seen += [r.run_id for r in response.context["runs"]]
            nxt = response.context["next_cursor"]
            url = f"/runs/?after={nxt}" if nxt else None
    finally:
        runs_view.PAGE_SIZE = size
    assert sorted(seen) == sorted(f"p-{i}" for i in range(7)) and len(seen) == 7
    assert client.get("/runs/?after=not-a-cursor").status_code == 404


def test_the_run_page_shows_header_timeline_tree_and_the_cache_hit_rate(client, bob, seeded):
    client.force_login(bob)
    page = client.get("/runs/acme/r-ok/").content.decode()
    assert 'class="timeline"' in page and 'data-span="tool-1"' in page and 'data-tree' in page
    assert "80 %" in page  # 800 of 1,000 input tokens read from the cache
    assert "class=\"ttft\"" in page  # time to first token marked on the model call
    assert "weather in Paris" not in page  # values load with their span, not with the page


def test_a_span_panel_shows_a_tool_calls_arguments_and_result(client, bob, seeded):
    client.force_login(bob)
    panel = client.get("/runs/acme/r-ok/spans/tool-1/").content.decode()
    assert "weather in Paris" in panel and "&quot;temp&quot;: 21" in panel
    running = client.get("/runs/acme/r-live/spans/open-1/").content.decode()
    assert "running" in running and "no result yet" in running


def test_a_large_value_is_previewed_and_loaded_whole_on_demand(client, bob, project, make_key):
    key = make_key(project)[0]
    big = "x" * 300_000
    _run(project, key, "r-big", spans=[{"span_id": "s-big", "kind": "llm", "name": "chat",
                                        "input_messages": [{"role": "user", "content": big}]}])
    drain()
    client.force_login(bob)
    assert client.get("/runs/acme/r-big/").status_code == 200
    panel = client.get("/runs/acme/r-big/spans/s-big/").content.decode()
    assert len(panel) < 120_000 and "Open the whole value" in panel
    whole = client.get("/runs/acme/r-big/spans/s-big/input_messages.json")
    assert whole.status_code == 200 and whole.json()[0]["content"] == big
    assert client.get("/runs/acme/r-big/spans/s-big/password.json").status_code == 404


def test_another_projects_run_and_its_spans_are_not_found(client, bob, charlie, seeded):
    client.force_login(bob)
    for url in ("/runs/globex/g-secret/", "/runs/globex/g-secret/export.json", "/runs/globex/g-secret/spans/x/",
                "/runs/acme/no-such-run/", "/runs/acme/r-ok/spans/nope/"):
        assert client.get(url).status_code == 404, url
    client.force_login(charlie)
    assert client.get("/runs/acme/r-ok/").status_code == 404
    assert b"no role in any project" in client.get("/runs/").content


def test_exports_stream_only_visible_filtered_runs_and_are_audited(client, bob, seeded):
    client.force_login(bob)
    before = AuditEvent.objects.count()
    response = client.get("/runs/export.csv?status=failed")
    rows = list(csv.reader(io.StringIO(read_streamed(response).decode())))
    assert rows[0][1] == "run_id" and [r[1] for r in rows[1:]] == ["r-bad"]
    response = client.get("/runs/export.json")
    data = json.loads(read_streamed(response))
    assert sorted(r["run_id"] for r in data) == ["r-bad", "r-live", "r-ok"]
    events = list(AuditEvent.objects.order_by("seq")[before:])
    assert [e.action for e in events] == ["traces.exported", "traces.exported"]
    assert events[0].actor_repr.startswith("bob") or "bob" in events[0].actor_repr
    exported = client.get("/runs/acme/r-ok/export.json")
    assert exported.status_code == 200 and json.loads(exported.content)["spans"][1]["tool"]["name"] == "search"


def test_pages_ask_a_fixed_number_of_queries(client, bob, project, make_key, django_assert_max_num_queries):
    key = make_key(project)[0]
    for i in range(30):
        _run(project, key, f"q-{i}", spans=[{"span_id": f"s{j}", "kind": "llm", "name": "chat", "model": "m"}
                                            for j in range(5)])
    drain()
    client.force_login(bob)
    with django_assert_max_num_queries(8):
        assert client.get("/runs/").status_code == 200
    with django_assert_max_num_queries(8):
        assert client.get("/runs/?agent=support-bot&status=completed&meta=a=b").status_code == 200
    with django_assert_max_num_queries(15):  # ... and its reservations, its approvals, its scores
        assert client.get("/runs/acme/q-3/").status_code == 200
    with django_assert_max_num_queries(24):  # ... the budgets' tile: the budgets, the thresholds crossed; the
        # approvals' tile: what waits (the oldest only when something does); the regressions' tile: one; the
        # queue's tile: what waits, what runs, what is paused, the devices
        assert client.get("/").status_code == 200


def test_a_run_of_5000_spans_draws_every_span_and_opens_its_tree_folded(client, bob, project, make_key,
                                                                         django_assert_max_num_queries):
    key = make_key(project)[0]
    spans = [{"span_id": "root", "kind": "agent", "name": "agent"}]
    for i in range(1666):
        spans += [{"span_id": f"step-{i}", "parent_span_id": "root", "kind": "step", "name": f"step {i}"},
                  {"span_id": f"llm-{i}", "parent_span_id": f"step-{i}", "kind": "llm", "name": "chat",
                   "input_messages": [{"role": "user", "content": "z" * 2000}]},
                  {"span_id": f"tool-{i}", "parent_span_id": f"step-{i}", "kind": "tool", "name": "search",
                   "tool": {"name": "search", "arguments": {"q": "w" * 2000}}}]
    _run(project, key, "huge", spans=spans[:4999] + [{"span_id": "last", "kind": "tool", "name": "t"}])
    drain()
    client.force_login(bob)
    with django_assert_max_num_queries(14):  # ... its scores: one
        page = client.get("/runs/acme/huge/").content.decode()
    assert page.count('<g class="row"') == 5000 and page.count("<li ") == 5000
    # Folded below the first level: the steps show, their model and tool calls wait for a click.
    assert 'data-span="step-7" data-depth="1" role="treeitem"' in page and 'aria-expanded="false"' in page
    assert page.count(" hidden") >= 3000
    assert "zzzzzzzzzz" not in page and "wwwwwwwwww" not in page  # large values stay on the server


def test_a_time_range_in_the_url_narrows_the_list(client, bob, project, make_key):
    key = make_key(project)[0]
    _run(project, key, "in-range")
    drain()
    client.force_login(bob)
    now = timezone.now()
    inside = client.get("/runs/", {"started_after": (now - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M"),
                                   "started_before": (now + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M")})
    assert "in-range" in inside.content.decode()
    before = client.get("/runs/", {"started_before": (now - timedelta(hours=2)).strftime("%Y-%m-%d %H:%M")})
    assert "in-range" not in before.content.decode() and 'name="started_before"' in before.content.decode()
