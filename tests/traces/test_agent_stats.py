"""Per agent version: how many runs, how they ended, how long they took, what they cost in tokens and
which errors they hit, over a window; through the API and the selector the agents page reads."""
from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.traces import housekeeping, selectors

from .helpers import at, drain

pytestmark = pytest.mark.django_db

USAGE = {"input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 25}


def post(client, url, body):
    r = client.post(url, data=json.dumps(body), content_type="application/json")
    assert r.status_code == 202, r.json()


def write_run(client, run_id, *, agent, version="", started, seconds=None, status="completed", error_code=None):
    """A run with one model call; finished ``seconds`` after its start with ``status`` (None: left running)."""
    post(client, "/api/v1/runs", {"run_id": run_id, "agent": {"name": agent, "version": version},
                                  "started_at": started})
    post(client, f"/api/v1/runs/{run_id}/spans", {"span_id": "m", "kind": "llm", "start_time": started,
                                                  "usage": USAGE})
    if seconds is not None:
        end = (datetime.fromisoformat(started) + timedelta(seconds=seconds)).isoformat()
        post(client, f"/api/v1/runs/{run_id}/finish", {"status": status, "ended_at": end,
                                                       **({"error_code": error_code} if error_code else {})})


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project)[1])


@pytest.fixture
def history(agent, other_project, make_key, key_client):
    """acme's support agent in two versions (1.0, then 2.0 from at(1000)), a triage agent, and a globex
    run of the same agent and version that acme must never count."""
    write_run(agent, "a", agent="support", version="1.0", started=at(0), seconds=10)
    write_run(agent, "b", agent="support", version="1.0", started=at(100), seconds=20, status="failed",
              error_code="tool_failed")
    for run_id, seconds, status, code in (("c", 10, "completed", None), ("d", 20, "failed", "auth"),
                                          ("e", 30, "failed", "rate_limited"), ("f", 40, "failed", "rate_limited"),
                                          ("g", 50, "failed", "upstream_500")):
        write_run(agent, run_id, agent="support", version="2.0", started=at(1000 + seconds), seconds=seconds,
                  status=status, error_code=code)
    write_run(agent, "i", agent="support", version="2.0", started=at(1100))  # goes quiet: lost
    write_run(agent, "t", agent="triage", started=at(1200), seconds=5, status="cancelled")
    write_run(key_client(make_key(other_project)[1]), "x", agent="support", version="2.0", started=at(1000),
              seconds=999, status="failed", error_code="globex_only")
    drain()
    housekeeping.runs_mark_lost(now=timezone.now() + timedelta(days=1))


def test_each_agent_version_has_its_outcomes_latency_tokens_and_errors(agent, history):
    r = agent.get(f"/api/v1/agents?since={at(0).replace('+', '%2B')}")
    assert r.status_code == 200, r.json()
    rows = r.json()["results"]
    # Newest version first within an agent: the version change is the boundary between rows.
    assert [(row["agent_name"], row["agent_version"]) for row in rows] == [
        ("support", "2.0"), ("support", "1.0"), ("triage", "")]
    v2, v1, triage = rows
    assert (v2["runs"], v2["completed"], v2["failed"]) == (6, 1, 5)  # the lost run counts as failed
    assert v2["success_rate"] == pytest.approx(1 / 6)
    # percentile_cont over the finished runs' durations (10..50 s); the lost run has none.
    assert (v2["p50_ms"], v2["p95_ms"]) == (pytest.approx(30_000), pytest.approx(48_000))
    assert (v2["input_tokens"], v2["output_tokens"], v2["cache_hit_rate"]) == (600, 60, 0.25)
    assert v2["top_errors"] == [{"error_code": "rate_limited", "count": 2}, {"error_code": "auth", "count": 1},
                                {"error_code": "run_lost", "count": 1}]
    assert (v2["first_started_at"], v2["last_started_at"]) == (at(1010).replace("+00:00", "Z"),
                                                               at(1100).replace("+00:00", "Z"))
    assert (v1["runs"], v1["success_rate"], v1["p50_ms"]) == (2, 0.5, pytest.approx(15_000))
    assert v1["top_errors"] == [{"error_code": "tool_failed", "count": 1}]
    # Cancelled: finished, but neither a success nor a failure.
    assert (triage["runs"], triage["completed"], triage["failed"], triage["success_rate"]) == (1, 0, 0, None)
    assert {row["project"] for row in rows} == {"acme"}


def test_the_window_bounds_which_runs_count(agent, history):
    def versions(query):
        return [(row["agent_name"], row["agent_version"], row["runs"])
                for row in agent.get(f"/api/v1/agents?{query.replace('+', '%2B')}").json()["results"]]

    assert versions(f"since={at(0)}&until={at(1000)}") == [("support", "1.0", 2)]
    assert versions(f"since={at(1050)}") == [("support", "2.0", 2), ("triage", "", 1)]
    assert versions(f"since={at(5000)}") == []


def test_the_default_window_is_the_last_seven_days(project, make_key, key_client):
    key, raw = make_key(project)
    client = key_client(raw)
    now = timezone.now()
    write_run(client, "recent", agent="support", started=(now - timedelta(days=6)).isoformat(), seconds=1)
    write_run(client, "old", agent="support", started=(now - timedelta(days=8)).isoformat(), seconds=1)
    drain()
    [row] = selectors.agent_stats(principal=key)
    assert row["runs"] == 1
    body = client.get("/api/v1/agents").json()
    assert [r["runs"] for r in body["results"]] == [1] and body["until"] is None


def test_outsiders_and_other_projects_keys_see_no_agent(history, make_key, key_client, other_project, client_for,
                                                       charlie, bob):
    since = f"since={at(0).replace('+', '%2B')}"
    theirs = key_client(make_key(other_project)[1]).get(f"/api/v1/agents?{since}").json()["results"]
    assert [(r["project"], r["top_errors"][0]["error_code"]) for r in theirs] == [("globex", "globex_only")]
    assert client_for(charlie).get(f"/api/v1/agents?{since}").json()["results"] == []
    assert client_for(bob).get(f"/api/v1/agents?{since}&project=globex").json()["results"] == []
    assert len(client_for(bob).get(f"/api/v1/agents?{since}&project=acme").json()["results"]) == 3


@pytest.mark.parametrize(("query", "field"), [("since=soon", "since"), ("until=2026-13-01", "until"),
                                              ("project=Not%20A%20Slug", "project")])
def test_a_malformed_window_is_a_400_naming_its_field(agent, query, field):
    r = agent.get(f"/api/v1/agents?{query}")
    assert r.status_code == 400 and r.json()["error_code"] == "invalid_request"
    assert r.json()["details"]["field"] == field


def test_a_key_without_the_read_scope_is_refused(project, make_key, key_client):
    r = key_client(make_key(project, scopes=["ingest"])[1]).get("/api/v1/agents")
    assert r.status_code == 403 and r.json()["error_code"] == "missing_scope"


def test_agent_stats_ask_a_fixed_number_of_queries_whatever_the_number_of_agents(agent, django_assert_num_queries):
    for i in range(12):
        write_run(agent, f"r{i}", agent=f"agent-{i % 6}", version=str(i // 6), started=at(i), seconds=i + 1,
                  status="failed" if i % 3 else "completed", error_code="boom" if i % 3 else None)
    drain()
    # The key (the writes just touched its last use), the grouped totals, the grouped error codes; on
    # SQLite the durations too.
    with django_assert_num_queries(3 if connection.vendor == "postgresql" else 4):
        r = agent.get(f"/api/v1/agents?since={at(0).replace('+', '%2B')}")
    assert len(r.json()["results"]) == 12
