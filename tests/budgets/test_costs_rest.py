"""Costs end to end over REST: spans sent by an agent, priced in the projection, rolled up per run
and per day, read back through GET /api/v1/costs; re-sends count once, late updates re-price once,
the re-derive command finds nothing to repair (and repairs what was tampered with)."""
from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command

from apps.budgets.models import CostDay, CostDayEndUser, CostDayUser, CostHour, SpanCost
from apps.projects import services as project_services
from apps.traces.models import Run
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db

# gpt-4o: $2.50 in, $1.25 cached, $10 out per million tokens; claude-sonnet-4: $3 in, $0.30 cache
# read, $3.75 cache write, $15 out.
GPT = {"provider": "openai", "model": "gpt-4o"}
CLAUDE = {"provider": "anthropic", "model": "claude-sonnet-4-20250514"}
T = "2026-11-24T10:00:0{}+00:00"


def post(client, url, body, **headers):
    return client.post(url, data=json.dumps(body), content_type="application/json", **headers)


def patch(client, url, body):
    return client.patch(url, data=json.dumps(body), content_type="application/json")


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project, scopes=("ingest", "read"))[1])


def send_run(agent, run_id="r1", agent_name="support", end_user="u-1", spans=None):
    assert post(agent, "/api/v1/runs", {"run_id": run_id, "agent": {"name": agent_name, "version": "1.0"},
                                        "end_user": end_user, "started_at": T.format(0)}).status_code == 202
    spans = spans if spans is not None else [
        {"span_id": "a", "kind": "llm", **GPT, "start_time": T.format(1), "end_time": T.format(2),
         "usage": {"input_tokens": 12_000, "cache_read_tokens": 8_000, "output_tokens": 900}},  # $0.029
        {"span_id": "b", "kind": "llm", **CLAUDE, "start_time": T.format(3), "end_time": T.format(4),
         "usage": {"input_tokens": 10_000, "cache_write_tokens": 10_000, "output_tokens": 1_000}},  # $0.0525
        {"span_id": "t", "kind": "tool", "tool": {"name": "lookup"}, "start_time": T.format(5),
         "end_time": T.format(6)},
    ]
    assert post(agent, f"/api/v1/runs/{run_id}/spans", spans).status_code == 202
    drain()


def costs(agent, **params) -> dict:
    r = agent.get("/api/v1/costs", params)
    assert r.status_code == 200, r.content
    return r.json()


def figures(project) -> tuple:
    return (sorted(Run.objects.values_list("run_id", "cost_usd")),
            sorted(SpanCost.objects.values_list("span_id", "source", "cost_nanos")),
            sorted(CostDay.objects.values_list("day", "agent_name", "model", "cost_nanos", "calls", "unpriced_calls",
                                               "input_tokens")),
            sorted(CostDayUser.objects.values_list("day", "end_user", "model", "cost_nanos", "calls")),
            sorted(CostDayEndUser.objects.values_list("day", "end_user", "cost_nanos", "calls", "unpriced_calls")),
            sorted(CostHour.objects.values_list("day", "hour", "scope", "value", "cost_nanos", "calls")))


def test_a_run_s_calls_are_priced_and_rolled_up_per_run_day_agent_and_model(agent, project):
    send_run(agent)
    run = Run.objects.get(run_id="r1")
    assert run.cost_usd == Decimal("0.0815")
    assert sorted(SpanCost.objects.values_list("span_id", "source", "cost_nanos")) == [
        ("a", "computed", 29_000_000), ("b", "computed", 52_500_000)]  # the tool call is not a model call

    by_day = costs(agent, group_by="day")
    assert by_day["rows"] == [{"day": "2026-11-24", "cost_usd": "0.081500000", "calls": 2, "unpriced_calls": 0,
                               "input_tokens": 22_000, "output_tokens": 1_900, "cache_read_tokens": 8_000,
                               "cache_write_tokens": 10_000, "reasoning_tokens": 0}]
    by_model = costs(agent, group_by="agent,model,provider", since="2026-11-01", until="2026-11-30")
    assert [(r["agent"], r["model"], r["provider"], r["cost_usd"]) for r in by_model["rows"]] == [
        ("support", "claude-sonnet-4-20250514", "anthropic", "0.052500000"),
        ("support", "gpt-4o", "openai", "0.029000000")]
    assert by_model["total"]["cost_usd"] == "0.081500000"

    detail = agent.get("/api/v1/runs/r1/costs").json()
    assert detail["cost_usd"] == "0.081500000" and detail["unpriced_spans"] == 0
    assert [(s["span_id"], s["source"], s["price_ref"].split()[-1]) for s in detail["spans"]] == [
        ("a", "computed", "openai/gpt-4o"), ("b", "computed", "anthropic/claude-sonnet-4-0")]


def test_costs_group_by_end_user_key_and_version_and_filter(agent, project):
    send_run(agent, run_id="r1", end_user="u-1")
    send_run(agent, run_id="r2", end_user="u-2", spans=[
        {"span_id": "a", "kind": "llm", **GPT, "start_time": T.format(1), "end_time": T.format(2),
         "usage": {"input_tokens": 1_000_000, "output_tokens": 0}}])  # $2.50
    since = {"since": "2026-11-01", "until": "2026-11-30"}
    rows = costs(agent, group_by="end_user", **since)["rows"]
    assert [(r["end_user"], r["cost_usd"]) for r in rows] == [("u-2", "2.500000000"), ("u-1", "0.081500000")]
    only = costs(agent, group_by="model", end_user="u-1", **since)["rows"]
    assert [(r["model"], r["cost_usd"]) for r in only] == [("claude-sonnet-4-20250514", "0.052500000"),
                                                           ("gpt-4o", "0.029000000")]
    [row] = costs(agent, group_by="key,version", **since)["rows"]
    assert row["key"]["name"] == "test" and row["version"] == "1.0" and row["cost_usd"] == "2.581500000"
    assert costs(agent, group_by="day", model="nothing", **since)["rows"] == []


def test_re_sending_everything_changes_no_figure(agent, project):
    send_run(agent)
    before = figures(project)
    send_run(agent)  # the same run start and spans again, without an Idempotency-Key
    assert figures(project) == before


def test_a_late_update_that_changes_usage_re_prices_its_span_once(agent, project):
    send_run(agent, spans=[{"span_id": "s", "kind": "llm", **GPT, "start_time": T.format(1)}])
    assert SpanCost.objects.count() == 0  # open and without usage: nothing to price yet
    assert Run.objects.get().cost_usd is None
    assert patch(agent, "/api/v1/runs/r1/spans/s", {"end_time": T.format(3), "usage": {
        "input_tokens": 1_000_000, "output_tokens": 100_000}}).status_code == 202  # a streamed call's usage, late
    drain()
    assert Run.objects.get().cost_usd == Decimal("3.5")
    assert patch(agent, "/api/v1/runs/r1/spans/s", {"usage": {"output_tokens": 200_000}}).status_code == 202
    drain()
    assert Run.objects.get().cost_usd == Decimal("4.5")
    assert CostDay.objects.get().cost_nanos == 4_500_000_000 and CostDay.objects.get().calls == 1
    assert patch(agent, "/api/v1/runs/r1/spans/s", {"status": "ok"}).status_code == 202  # no pricing input changed
    drain()
    assert CostDay.objects.get().cost_nanos == 4_500_000_000


def test_an_unpriced_model_is_counted_and_listed_not_zero(agent, project):
    send_run(agent, spans=[{"span_id": "x", "kind": "llm", "provider": "acme", "model": "acme-7b",
                            "start_time": T.format(1), "end_time": T.format(2),
                            "usage": {"input_tokens": 500, "output_tokens": 20}}])
    assert Run.objects.get().cost_usd is None
    [row] = costs(agent, group_by="model", since="2026-11-24", until="2026-11-24")["rows"]
    assert (row["model"], row["calls"], row["unpriced_calls"], row["cost_usd"]) == ("acme-7b", 0, 1, "0.000000000")
    [listed] = agent.get("/api/v1/costs/unpriced").json()
    assert (listed["model"], listed["provider"], listed["calls"]) == ("acme-7b", "acme", 1)
    assert "acme/acme-7b" in listed["reason"]


def test_a_reported_cost_counts_and_a_disagreement_is_flagged(agent, project):
    send_run(agent, spans=[
        {"span_id": "a", "kind": "llm", **GPT, "start_time": T.format(1), "end_time": T.format(2),
         "cost_usd": "0.05", "usage": {"input_tokens": 12_000, "cache_read_tokens": 8_000, "output_tokens": 900}}])
    [s] = agent.get("/api/v1/runs/r1/costs").json()["spans"]
    assert (s["source"], s["cost_usd"], s["computed_usd"], s["disagreement"]) == (
        "reported", "0.050000000", "0.029000000", True)


def test_child_runs_costs_are_beside_the_parent_s_not_in_it(agent, project):
    send_run(agent, run_id="parent")
    assert post(agent, "/api/v1/runs", {"run_id": "child", "parent_run_id": "parent",
                                        "started_at": T.format(0)}).status_code == 202
    assert post(agent, "/api/v1/runs/child/spans", [{"span_id": "c", "kind": "llm", **GPT, "start_time": T.format(1),
                                                     "end_time": T.format(2), "usage": {"input_tokens": 400_000}}]
                ).status_code == 202
    drain()
    detail = agent.get("/api/v1/runs/parent/costs").json()
    assert (detail["cost_usd"], detail["children_cost_usd"]) == ("0.081500000", "1.000000000")
    assert detail["child_runs"] == [{"run_id": "child", "cost_usd": "1.000000000"}]


def test_an_agent_name_arriving_after_the_calls_moves_their_spend(agent, project):
    """OTLP's order: the model calls end (and arrive) before the root span that names the agent."""
    assert post(agent, "/api/v1/runs/late/spans", [{"span_id": "a", "kind": "llm", **GPT, "start_time": T.format(1),
                                                    "end_time": T.format(2),
                                                    "usage": {"input_tokens": 400_000}}]).status_code == 202
    drain()
    assert [r["agent"] for r in costs(agent, group_by="agent", since="2026-11-24", until="2026-11-24")["rows"]] == [""]
    assert post(agent, "/api/v1/runs", {"run_id": "late", "agent": {"name": "triage"}, "end_user": "u-9",
                                        "started_at": T.format(0)}).status_code == 202
    drain()
    rows = costs(agent, group_by="agent,end_user", since="2026-11-24", until="2026-11-24")["rows"]
    assert [(r["agent"], r["end_user"], r["cost_usd"]) for r in rows] == [("triage", "u-9", "1.000000000")]
    assert sorted(CostHour.objects.filter(cost_nanos__gt=0).values_list("scope", "value")) == [
        ("agent", "triage"), ("end_user", "u-9"), ("project", "")]
    out = StringIO()
    call_command("costs_rederive", "--since", "2026-11-24", "--until", "2026-11-24", stdout=out)
    assert "no difference found" in out.getvalue()


def test_a_call_at_23_30_local_lands_on_the_local_day(agent, project, alice):
    project_services.project_update(project=project, actor=alice, time_zone="America/New_York")
    # 2026-11-25 04:30 UTC is 2026-11-24 23:30 in New York (UTC-5 in November).
    send_run(agent, spans=[{"span_id": "late", "kind": "llm", **GPT, "start_time": "2026-11-25T04:30:00+00:00",
                            "end_time": "2026-11-25T04:30:05+00:00", "usage": {"input_tokens": 400_000}}])
    sc = SpanCost.objects.get()
    assert (sc.day, sc.hour) == (date(2026, 11, 24), 23)
    rows = costs(agent, group_by="day", since="2026-11-20", until="2026-11-30")["rows"]
    assert [(r["day"], r["cost_usd"]) for r in rows] == [("2026-11-24", "1.000000000")]


def test_the_re_derive_command_finds_nothing_then_repairs_what_was_tampered_with(agent, project):
    send_run(agent)
    send_run(agent, run_id="r2", end_user="u-2")
    out = StringIO()
    call_command("costs_rederive", "--since", "2026-11-24", "--until", "2026-11-24", stdout=out)
    assert "no difference found" in out.getvalue(), out.getvalue()
    good = figures(project)

    CostDay.objects.update(cost_nanos=1)
    CostDayEndUser.objects.filter(end_user="u-2").delete()
    CostHour.objects.filter(scope="project").delete()
    SpanCost.objects.filter(span_id="b").delete()
    Run.objects.filter(run_id="r1").update(cost_usd=Decimal("99"))
    out = StringIO()
    call_command("costs_rederive", "--project", "acme", "--since", "2026-11-24", "--until", "2026-11-24", stdout=out)
    text = out.getvalue()
    assert "span_costs_added 2" in text and "day_rollups" in text and "day_end_user_rollups" in text and "hour_rollups" in text and "run_costs 1" in text
    assert figures(project) == good
    out = StringIO()
    call_command("costs_rederive", "--since", "2026-11-24", "--until", "2026-11-24", stdout=out)
    assert "no difference found" in out.getvalue()


def test_bad_cost_queries_are_refused_with_a_stable_code(agent):
    for params, field in (({"group_by": "day,colour"}, "group_by"), ({"since": "yesterday"}, "since"),
                          ({"since": "2026-11-30", "until": "2026-11-01"}, "since"), ({"key": "x"}, "key")):
        r = agent.get("/api/v1/costs", params)
        assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", (params, r.content)
        assert r.json()["details"]["field"] == field
    r = post(agent, "/api/v1/runs/r1/spans", [{"span_id": "a", "kind": "llm", "cost_usd": "-1"}])
    assert r.status_code == 400 and r.json()["details"]["field"] == "spans[0].cost_usd"
