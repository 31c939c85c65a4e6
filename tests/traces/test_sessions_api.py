"""A session (one conversation, many runs) read as turns, and its tool calls page by page."""
from __future__ import annotations

import json

import pytest

from apps.projects import services as project_services
from apps.projects.models import Role
from apps.traces import selectors

from .helpers import at, drain

pytestmark = pytest.mark.django_db


def post(client, url, body):
    r = client.post(url, data=json.dumps(body), content_type="application/json")
    assert r.status_code == 202, r.json()


def write_turn(client, run_id, *, session="conv-1", started: int, seconds: int | None, usage: dict, tools=0):
    """One run of the session: a model call with ``usage`` and ``tools`` tool calls, finished after ``seconds``
    (None: still running)."""
    post(client, "/api/v1/runs", {"run_id": run_id, "agent": {"name": "support", "version": "2"},
                                  "session_id": session, "started_at": at(started)})
    spans = [{"span_id": "m", "kind": "llm", "start_time": at(started), "usage": usage}]
    spans += [{"span_id": f"t{i}", "kind": "tool", "start_time": at(started + 1 + i), "end_time": at(started + 2 + i),
               "status": "ok", "tool": {"name": f"{run_id}-tool-{i}", "arguments": {"n": i}}} for i in range(tools)]
    post(client, f"/api/v1/runs/{run_id}/spans", spans)
    if seconds is not None:
        post(client, f"/api/v1/runs/{run_id}/finish", {"status": "completed", "ended_at": at(started + seconds)})


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project)[1])


@pytest.fixture
def conversation(agent, other_project, make_key, key_client):
    """Three turns of conv-1 in acme (the last still running), and a globex run with the same session id."""
    write_turn(agent, "turn-1", started=0, seconds=10, usage={"input_tokens": 1000, "output_tokens": 100}, tools=2)
    write_turn(agent, "turn-2", started=20, seconds=5,
               usage={"input_tokens": 1200, "output_tokens": 50, "cache_read_tokens": 900}, tools=1)
    write_turn(agent, "turn-3", started=30, seconds=None,
               usage={"input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 700, "cache_write_tokens": 200})
    write_turn(key_client(make_key(other_project)[1]), "elsewhere", started=5, seconds=1,
               usage={"input_tokens": 5}, tools=3)
    drain()


def test_a_session_reads_as_turns_with_running_totals(agent, conversation):
    r = agent.get("/api/v1/sessions/conv-1")
    assert r.status_code == 200, r.json()
    session = r.json()
    assert (session["project"], session["turn_count"], session["truncated"]) == ("acme", 3, False)
    turns = session["turns"]
    assert [(t["run_id"], t["status"], t["offset_ms"], t["duration_ms"], t["tool_calls"]) for t in turns] == [
        ("turn-1", "completed", 0, 10_000, 2), ("turn-2", "completed", 20_000, 5_000, 1),
        ("turn-3", "running", 30_000, None, 0)]
    assert turns[0]["agent"] == {"name": "support", "version": "2"}
    # Per turn: no cache, 900 of a 1,200-token prompt, then 700 read of 100 + 700 + 200 (input excluding cache).
    assert [t["cache_hit_rate"] for t in turns] == [0.0, 0.75, 0.7]
    assert turns[1]["tokens"] == {"input_tokens": 1200, "output_tokens": 50, "cache_read_tokens": 900,
                                  "cache_write_tokens": 0}
    assert turns[1]["cumulative"] == {"input_tokens": 2200, "output_tokens": 150, "cache_read_tokens": 900,
                                      "cache_write_tokens": 0, "cache_hit_rate": pytest.approx(900 / 2200)}
    assert session["totals"] == turns[2]["cumulative"]
    assert session["totals"]["input_tokens"] == 2300 and session["span_ms"] == 30_000


def test_a_session_longer_than_the_limit_opens_with_its_first_turns(agent, conversation, monkeypatch):
    monkeypatch.setattr(selectors, "SESSION_MAX_TURNS", 2)
    session = agent.get("/api/v1/sessions/conv-1").json()
    assert [t["run_id"] for t in session["turns"]] == ["turn-1", "turn-2"]
    assert (session["truncated"], session["max_turns"], session["turn_count"]) == (True, 2, 2)


def test_a_session_nobody_visible_holds_is_404(agent, conversation, make_key, key_client, other_project,
                                               client_for, charlie, bob):
    assert agent.get("/api/v1/sessions/no-such").status_code == 404
    assert agent.get("/api/v1/sessions/conv-1?project=globex").status_code == 404
    r = client_for(charlie).get("/api/v1/sessions/conv-1")
    assert r.status_code == 404 and r.json()["error_code"] == "not_found"
    # Globex's key sees only globex's run of that session id.
    theirs = key_client(make_key(other_project)[1]).get("/api/v1/sessions/conv-1").json()
    assert [t["run_id"] for t in theirs["turns"]] == ["elsewhere"] and theirs["project"] == "globex"
    assert client_for(bob).get("/api/v1/sessions/conv-1").json()["turn_count"] == 3
    assert agent.get("/api/v1/sessions/a%00b").status_code == 404


def test_a_person_seeing_the_session_in_two_projects_is_asked_to_name_one(conversation, other_project, alice,
                                                                           client_for):
    project_services.role_grant(project=other_project, user=alice, role=Role.AUDITOR, actor=None)
    c = client_for(alice)
    r = c.get("/api/v1/sessions/conv-1")
    assert r.status_code == 400 and r.json()["details"] == {"field": "project", "projects": ["acme", "globex"]}
    assert c.get("/api/v1/sessions/conv-1?project=globex").json()["turn_count"] == 1


def test_a_sessions_tool_calls_page_oldest_first(agent, conversation):
    seen, url = [], "/api/v1/sessions/conv-1/tool-calls?limit=2"
    while url:
        page = agent.get(url).json()
        seen += [(t["run_id"], t["span_id"], t["name"], t["project"]) for t in page["results"]]
        url = page["next"]
    assert seen == [("turn-1", "t0", "turn-1-tool-0", "acme"), ("turn-1", "t1", "turn-1-tool-1", "acme"),
                    ("turn-2", "t0", "turn-2-tool-0", "acme")]
    first = agent.get("/api/v1/sessions/conv-1/tool-calls").json()["results"][0]
    assert (first["arguments"], first["status"], first["latency_ms"]) == ({"n": 0}, "ok", 1000)


def test_outsiders_see_none_of_a_sessions_tool_calls(conversation, make_key, key_client, other_project, client_for,
                                                     charlie):
    assert client_for(charlie).get("/api/v1/sessions/conv-1/tool-calls").json()["results"] == []
    theirs = key_client(make_key(other_project)[1]).get("/api/v1/sessions/conv-1/tool-calls").json()["results"]
    assert {t["run_id"] for t in theirs} == {"elsewhere"}


def test_session_reads_ask_a_fixed_number_of_queries(agent, conversation, django_assert_num_queries):
    for i in range(10):
        write_turn(agent, f"more-{i}", started=100 + i, seconds=1, usage={"input_tokens": 1}, tools=2)
    drain()
    # The key (the writes just touched its last use), the turns, their tool call counts (one grouped query).
    with django_assert_num_queries(3):
        assert agent.get("/api/v1/sessions/conv-1").json()["turn_count"] == 13
    # The key, then one page of tool calls with their runs, spans and project joined in.
    with django_assert_num_queries(2):
        assert len(agent.get("/api/v1/sessions/conv-1/tool-calls?limit=50").json()["results"]) == 23
