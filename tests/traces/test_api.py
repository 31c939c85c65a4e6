"""The run log's REST API: write a run the way an agent does, read it back the way an auditor does."""
from __future__ import annotations

import json
import uuid

import pytest
from django.core.management import call_command

from apps.projects import services as project_services
from apps.traces.models import IngestBatch, Run, Span, SpanUpdate, ToolCall

from .helpers import at, drain

pytestmark = pytest.mark.django_db


@pytest.fixture
def agent(project, make_key, key_client):
    """A client holding the project's ingest+read key."""
    return key_client(make_key(project)[1])


def json_nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def post(client, url, body, **headers):
    return client.post(url, data=json.dumps(body), content_type="application/json", **headers)


def patch(client, url, body, **headers):
    return client.patch(url, data=json.dumps(body), content_type="application/json", **headers)


SPANS = [
    {"span_id": "root", "kind": "agent", "name": "support-bot", "start_time": at(0), "end_time": at(50),
     "status": "ok"},
    {"span_id": "plan", "parent_span_id": "root", "kind": "step", "component": "planner", "action": "plan",
     "details": {"steps": 2}, "start_time": at(1), "end_time": at(2), "status": "ok"},
    {"span_id": "llm1", "parent_span_id": "root", "kind": "llm", "provider": "openai", "model": "gpt-4o",
     "response_model": "gpt-4o-2024-08-06", "start_time": at(2), "end_time": at(5), "status": "ok",
     "usage": {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 1000, "reasoning_tokens": 50},
     "time_to_first_token_ms": 420.5, "stream": {"chunks": 31, "output_tokens_per_second": 95.2},
     "input_messages": [{"role": "user", "content": "Where is my order?"}],
     "output_messages": [{"role": "assistant", "tool_calls": [{"name": "lookup_order"}]}],
     "attributes": {"gen_ai.request.temperature": 0.2, "custom.flag": True}},
    {"span_id": "tool1", "parent_span_id": "llm1", "kind": "tool", "start_time": at(5), "end_time": at(6),
     "status": "error", "status_message": "timeout", "error_code": "tool_timeout",
     "tool": {"name": "lookup_order", "call_id": "call_1", "arguments": {"order": "A-1"}}},
    {"span_id": "tool2", "parent_span_id": "llm1", "kind": "tool", "start_time": at(6), "end_time": at(7),
     "status": "ok", "retry_of": "tool1",
     "tool": {"name": "lookup_order", "call_id": "call_2", "arguments": {"order": "A-1"},
              "result": {"status": "shipped"}}},
    {"span_id": "llm2", "parent_span_id": "root", "kind": "llm", "provider": "openai", "model": "gpt-4o",
     "start_time": at(7), "end_time": at(9), "status": "error", "status_message": "rate limited",
     "error_code": "rate_limited"},
    {"span_id": "llm3", "parent_span_id": "root", "kind": "llm", "provider": "anthropic", "model": "claude-sonnet-4",
     "fallback_of": "llm2", "start_time": at(9), "usage": {"input_tokens": 800, "output_tokens": 120,
                                                            "cache_write_tokens": 700}},
]


def build_run(client, run_id="r1", **start):
    body = {"run_id": run_id, "agent": {"name": "support-bot", "version": "1.2"}, "input": {"q": "Where is my order?"},
            "end_user": "user-42", "session_id": "sess-1", "metadata": {"channel": "web"}, "started_at": at(0),
            **start}
    r = post(client, "/api/v1/runs", body)
    assert r.status_code == 202, r.json()
    r = post(client, f"/api/v1/runs/{run_id}/spans", SPANS)
    assert r.status_code == 202, r.json()
    # llm3 was opened without an end; close it later, with its output.
    r = patch(client, f"/api/v1/runs/{run_id}/spans/llm3",
              {"end_time": at(12), "status": "ok", "output_messages": [{"role": "assistant", "content": "Shipped."}]})
    assert r.status_code == 202, r.json()
    r = post(client, f"/api/v1/runs/{run_id}/finish", {"status": "completed", "output": {"answer": "It shipped."},
                                                       "ended_at": at(60)})
    assert r.status_code == 202, r.json()


def test_a_run_built_through_the_api_reads_back_with_tree_tools_totals_and_end_user(agent):
    build_run(agent)
    assert Run.objects.count() == 0  # accepted (202) durably; a worker projects it
    drain()

    r = agent.get("/api/v1/runs/r1")
    assert r.status_code == 200, r.json()
    run = r.json()
    assert run["id"] == "r1" and run["project"] == "acme"
    assert run["agent"] == {"name": "support-bot", "version": "1.2"}
    assert (run["end_user"], run["session_id"], run["status"]) == ("user-42", "sess-1", "completed")
    assert run["input"] == {"q": "Where is my order?"} and run["output"] == {"answer": "It shipped."}
    assert run["duration_ms"] == 60_000
    assert run["usage"] == {"input_tokens": 2000, "output_tokens": 420, "cache_read_tokens": 1000,
                            "cache_write_tokens": 700, "reasoning_tokens": 50, "total_tokens": 2420}
    assert sorted(run["models_used"]) == ["claude-sonnet-4", "gpt-4o", "gpt-4o-2024-08-06"]
    assert sorted(run["providers_used"]) == ["anthropic", "openai"]
    assert (run["span_count"], run["error_span_count"]) == (7, 2)
    assert run["failing_span_id"] == ""  # both errors were recovered

    spans = run["spans"]
    # Tree order: depth-first, siblings by start time.
    assert [(s["span_id"], s["depth"]) for s in spans] == [
        ("root", 0), ("plan", 1), ("llm1", 1), ("tool1", 2), ("tool2", 2), ("llm2", 1), ("llm3", 1)]
    by_id = {s["span_id"]: s for s in spans}
    assert by_id["root"]["children"] == ["plan", "llm1", "llm2", "llm3"]
    assert by_id["llm1"]["usage"]["cache_read_tokens"] == 1000 and by_id["llm1"]["stream"]["chunks"] == 31
    assert by_id["llm1"]["attributes"] == {"gen_ai.request.temperature": 0.2, "custom.flag": True}
    assert by_id["plan"]["component"] == "planner" and by_id["plan"]["details"] == {"steps": 2}
    assert by_id["tool2"]["recovers"] == {"span_id": "tool1", "via": "retry", "status": "error",
                                          "error_code": "tool_timeout", "status_message": "timeout"}
    assert by_id["tool1"]["recovered_by"] == {"span_id": "tool2", "via": "retry"}
    assert by_id["llm3"]["recovers"]["error_code"] == "rate_limited"
    # The late update closed llm3 without rewriting it: the read model shows it closed.
    assert by_id["llm3"]["end_time"] and by_id["llm3"]["duration_ms"] == 3000 and by_id["llm3"]["updated"]
    assert by_id["llm3"]["output_messages"] == [{"role": "assistant", "content": "Shipped."}]
    assert Span.objects.get(span_id="llm3").end_time is None and SpanUpdate.objects.count() == 1

    tools = run["tool_calls"]
    assert [(t["span_id"], t["name"], t["status"]) for t in tools] == [
        ("tool1", "lookup_order", "error"), ("tool2", "lookup_order", "ok")]
    assert tools[1]["result"] == {"status": "shipped"} and tools[1]["latency_ms"] == 1000


def test_ids_are_assigned_when_the_client_sends_none(agent):
    r = post(agent, "/api/v1/runs", {"agent": "bot"})
    assert r.status_code == 202
    run_id = r.json()["run_id"]
    assert len(run_id) == 32 and r.json()["trace_id"] and r.json()["batch_id"]
    r = post(agent, f"/api/v1/runs/{run_id}/spans", {"name": "think", "start_time": at(1)})
    assert r.status_code == 202
    (span_id,) = r.json()["span_ids"]
    drain()
    run = agent.get(f"/api/v1/runs/{run_id}").json()
    assert run["agent"]["name"] == "bot" and [s["span_id"] for s in run["spans"]] == [span_id]
    assert run["spans"][0]["kind"] == "other" and run["spans"][0]["end_time"] is None  # open: still running


def test_idempotency_key_replays_the_first_answer_and_refuses_another_body(agent):
    body = [{"span_id": "s1", "kind": "llm", "usage": {"input_tokens": 10}, "start_time": at(1)}]
    first = post(agent, "/api/v1/runs/r1/spans", body, HTTP_IDEMPOTENCY_KEY="k-1")
    again = post(agent, "/api/v1/runs/r1/spans", body, HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert IngestBatch.objects.count() == 1

    other = post(agent, "/api/v1/runs/r1/spans", [{**body[0], "usage": {"input_tokens": 99}}],
                 HTTP_IDEMPOTENCY_KEY="k-1")
    assert other.status_code == 409 and other.json()["error_code"] == "idempotency_conflict"
    # The same key on another endpoint is another request too.
    assert post(agent, "/api/v1/runs/r1/finish", {}, HTTP_IDEMPOTENCY_KEY="k-1").status_code == 409
    assert IngestBatch.objects.count() == 1

    # Without a key, a re-sent span is stored once and counted once.
    assert post(agent, "/api/v1/runs/r1/spans", body).status_code == 202
    drain()
    run = agent.get("/api/v1/runs/r1").json()
    assert run["span_count"] == 1 and run["usage"]["input_tokens"] == 10 and Span.objects.count() == 1


def test_out_of_order_writes_link_up(agent):
    # An update before its span, spans before their run, a child run before its parent.
    assert patch(agent, "/api/v1/runs/child/spans/c1", {"end_time": at(3), "status": "ok"}).status_code == 202
    assert post(agent, "/api/v1/runs/child/spans", {"span_id": "c1", "kind": "llm", "start_time": at(1),
                                                     "usage": {"output_tokens": 5}}).status_code == 202
    assert post(agent, "/api/v1/runs", {"run_id": "child", "parent_run_id": "parent", "started_at": at(0)}
                ).status_code == 202
    drain()
    assert post(agent, "/api/v1/runs", {"run_id": "parent", "agent": "orchestrator", "started_at": at(0)}
                ).status_code == 202
    drain()
    child = agent.get("/api/v1/runs/child").json()
    assert child["parent_run_id"] == "parent" and child["spans"][0]["end_time"] and child["usage"]["output_tokens"] == 5
    assert agent.get("/api/v1/runs/parent").json()["child_run_ids"] == ["child"]


def test_a_failed_run_names_its_failing_span(agent):
    post(agent, "/api/v1/runs", {"run_id": "f1", "started_at": at(0)})
    post(agent, "/api/v1/runs/f1/spans", [
        {"span_id": "t1", "kind": "tool", "tool": {"name": "search"}, "start_time": at(1), "end_time": at(2),
         "status": "error", "error_code": "upstream_500"}])
    r = post(agent, "/api/v1/runs/f1/finish", {"status": "failed", "error_code": "tool_failed",
                                               "error_details": {"tool": "search", "http_status": 500}})
    assert r.status_code == 202 and r.json()["status"] == "failed"
    drain()
    run = agent.get("/api/v1/runs/f1").json()
    assert (run["status"], run["error_code"], run["failing_span_id"]) == ("failed", "tool_failed", "t1")
    assert run["error_details"] == {"tool": "search", "http_status": 500}


@pytest.mark.parametrize(("url", "body", "field"), [
    ("/api/v1/runs/r1/spans", [{"span_id": "a"}, {"span_id": "b", "kind": "banana"}], "spans[1].kind"),
    ("/api/v1/runs/r1/spans", [{"kind": "llm", "usage": {"input_tokens": -1}}], "spans[0].usage.input_tokens"),
    ("/api/v1/runs/r1/spans", {"start_time": at(5), "end_time": at(1)}, "end_time"),
    ("/api/v1/runs/r1/spans", {"start_time": "yesterday"}, "start_time"),
    ("/api/v1/runs", {"input": "x" * (10 * 1024 * 1024)}, "input"),
    ("/api/v1/runs", {"run_id": "has space"}, "run_id"),
    ("/api/v1/runs/r1/finish", {"status": "done"}, "status"),
    ("/api/v1/runs", [1, 2], "body"),
    ("/api/v1/runs/r1/spans", {"spans": 1}, "spans"),
    ("/api/v1/runs/r1/spans", [7], "spans[0]"),
    ("/api/v1/runs", {"run_id": "abc\n"}, "run_id"),
    ("/api/v1/runs", {"started_at": "0001-01-01T00:00:00+01:00"}, "started_at"),
    ("/api/v1/runs", {"started_at": "9999-12-31T00:00:00Z"}, "started_at"),
    ("/api/v1/runs", {"metadata": {"k": "nul\u0000byte"}}, "metadata"),
    ("/api/v1/runs", {"input": {"text": "half a surrogate \ud800"}}, "input"),
    ("/api/v1/runs", {"input": {"text": "a low half \udfff"}}, "input"),
    ("/api/v1/runs/r1/spans", [{"span_id": "a"}, {"name": "low half \udfff"}], "spans[1].name"),
    ("/api/v1/runs/r1/spans", [{"name": "nul \u0000"}], "spans[0].name"),
    ("/api/v1/runs/r1/spans", [{"kind": "llm", "usage": {"input_tokens": 2**63}}], "spans[0].usage.input_tokens"),
    ("/api/v1/runs/r1/spans", [{"kind": "llm", "stream": {"chunks": 2**31}}], "spans[0].stream.chunks"),
    ("/api/v1/runs/r1/spans", [{"details": {"k\u0000": 1}}], "spans[0].details"),
    ("/api/v1/runs", {"input": {"deep": json_nested(900)}}, "input"),
    ("/api/v1/runs/r1/spans/s1", {"attributes": {"deep": json_nested(70)}}, "attributes"),
    ("/api/v1/runs/r1/finish", {"output": "nul \u0000"}, "output"),
])
def test_bad_input_is_refused_with_the_field_at_fault_and_nothing_stored(agent, url, body, field):
    r = agent.patch(url, data=json.dumps(body), content_type="application/json") if url.count("/") == 6 \
        else post(agent, url, body)
    assert r.status_code == 400, r.json()
    assert r.json()["error_code"] == "invalid_request" and r.json()["details"]["field"] == field
    assert IngestBatch.objects.count() == 0


def test_nan_and_infinity_are_not_json(agent):
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"):
        r = agent.post("/api/v1/runs", data=b'{"input": {"score": ' + literal + b"}}", content_type="application/json")
        assert r.status_code == 400 and r.json()["error_code"] == "parse_error"
    assert IngestBatch.objects.count() == 0


def test_json_with_a_charset_and_a_valid_emoji_is_accepted(agent):
    r = agent.post("/api/v1/runs", data=json.dumps({"input": "ok \U0001F600"}).encode(),
                   content_type="application/json; charset=utf-8")
    assert r.status_code == 202, r.json()
    uuid.UUID(r.json()["batch_id"])  # opaque, says nothing about other projects' volume
    drain()
    assert Run.objects.get().input == "ok \U0001F600"


def test_odd_ids_in_paths_and_params_are_answered_not_crashed_on(agent):
    assert agent.get("/api/v1/runs/a%00b").status_code == 404
    assert agent.get("/api/v1/sessions/a%00b/runs").status_code == 404
    assert agent.get("/api/v1/runs/" + "x" * 300).status_code == 404
    r = agent.get("/api/v1/runs?project=Not%20A%20Slug")
    assert r.status_code == 400 and "project" in r.json()["details"]["fields"]
    r = agent.get("/api/v1/runs/r1?project=a%00b")
    assert r.status_code == 400 and r.json()["details"]["field"] == "project"
    r = agent.get("/api/v1/runs?cursor=zzz")
    assert r.status_code == 400 and r.json()["details"]["field"] == "cursor"
    assert agent.get("/api/v1/runs?agent=a%00b").status_code == 400


def test_bad_patch_and_bodies(agent):
    r = patch(agent, "/api/v1/runs/r1/spans/s1", {"status": "maybe"})
    assert r.status_code == 400 and r.json()["details"]["field"] == "status"
    r = patch(agent, "/api/v1/runs/r1/spans/s1", {})
    assert r.status_code == 400 and r.json()["details"]["field"] == "body"
    r = agent.post("/api/v1/runs/r1/spans", data=b'{"name": "x",', content_type="application/json")
    assert r.status_code == 400 and r.json()["error_code"] == "parse_error" and r.json()["details"]["line"] == 1
    r = agent.post("/api/v1/runs", data=b"name=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and r.json()["error_code"] == "unsupported_media_type"
    r = post(agent, "/api/v1/runs", {}, HTTP_IDEMPOTENCY_KEY="k" * 300)
    assert r.status_code == 400 and r.json()["details"]["field"] == "Idempotency-Key"
    assert IngestBatch.objects.count() == 0


def test_a_body_over_the_request_limit_is_413(agent, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    r = post(agent, "/api/v1/runs/r1/spans", [{"name": f"s{i}", "attributes": {"pad": "x" * 100}} for i in range(200)])
    assert r.status_code == 413 and r.json()["error_code"] == "payload_too_large"
    assert IngestBatch.objects.count() == 0


def _make_runs(client):
    rows = [
        ("a1", "alpha", "u1", "s1", "openai", "gpt-4o", "ok", at(10), "refund my order"),
        ("a2", "alpha", "u2", "s1", "anthropic", "claude-sonnet-4", "ok", at(20), "where is my parcel"),
        ("b1", "beta", "u1", "s2", "openai", "gpt-4o-mini", "error", at(30), "cancel subscription"),
        ("b2", "beta", "u3", "", "openai", "gpt-4o", "ok", at(40), "Refund please"),
    ]
    for run_id, agent_name, user, session, provider, model, status, started, text in rows:
        post(client, "/api/v1/runs", {"run_id": run_id, "agent": agent_name, "end_user": user, "session_id": session,
                                      "input": {"text": text}, "started_at": started})
        post(client, f"/api/v1/runs/{run_id}/spans", {"kind": "llm", "provider": provider, "model": model,
                                                      "status": status, "start_time": started})
    post(client, "/api/v1/runs/a1/finish", {"status": "completed"})
    drain()


@pytest.mark.parametrize(("query", "expected"), [
    ("", ["b2", "b1", "a2", "a1"]),
    ("?agent=alpha", ["a2", "a1"]),
    ("?end_user=u1", ["b1", "a1"]),
    ("?session_id=s1", ["a2", "a1"]),
    ("?model=gpt-4o", ["b2", "a1"]),
    ("?provider=anthropic", ["a2"]),
    ("?status=completed", ["a1"]),
    ("?status=running,completed", ["b2", "b1", "a2", "a1"]),
    ("?has_error=true", ["b1"]),
    ("?has_error=false", ["b2", "a2", "a1"]),
    ("?q=refund", ["b2", "a1"]),
    (f"?started_after={at(20).replace('+', '%2B')}&started_before={at(40).replace('+', '%2B')}", ["b1", "a2"]),
    ("?project=acme&agent=beta", ["b2", "b1"]),
    ("?project=globex", []),
])
def test_run_list_filters(agent, query, expected):
    _make_runs(agent)
    r = agent.get(f"/api/v1/runs{query}")
    assert r.status_code == 200, r.json()
    assert [run["id"] for run in r.json()["results"]] == expected


def test_run_list_refuses_bad_filters(agent):
    r = agent.get("/api/v1/runs?status=sleeping")
    assert r.status_code == 400 and "status" in r.json()["details"]["fields"]
    assert agent.get("/api/v1/runs?started_after=soon").status_code == 400


def test_cursor_pagination_walks_every_run_once_newest_first(agent):
    for i in range(7):
        post(agent, "/api/v1/runs", {"run_id": f"r{i}", "started_at": at(i)})
    drain()
    seen, url = [], "/api/v1/runs?limit=3"
    while url:
        page = agent.get(url).json()
        seen += [r["id"] for r in page["results"]]
        url = page["next"]
    assert seen == [f"r{i}" for i in reversed(range(7))]


def test_session_runs_in_order(agent):
    _make_runs(agent)
    r = agent.get("/api/v1/sessions/s1/runs")
    assert r.status_code == 200 and [run["id"] for run in r.json()["results"]] == ["a1", "a2"]


def test_a_run_with_5000_spans_reads_back_in_a_fixed_number_of_queries(agent, django_assert_max_num_queries):
    spans = [{"span_id": "root", "kind": "agent", "start_time": at(0)}]
    spans += [{"span_id": f"s{i}", "parent_span_id": "root" if i % 2 else f"s{i - 1}", "kind": "llm",
               "start_time": at(1 + i / 1000), "usage": {"input_tokens": 1}} for i in range(4999)]
    assert post(agent, "/api/v1/runs/big/spans", spans).status_code == 202
    post(agent, "/api/v1/runs/big/spans", {"span_id": "t", "kind": "tool", "tool": {"name": "x"}, "start_time": at(9)})
    patch(agent, "/api/v1/runs/big/spans/s7", {"end_time": at(20)})
    drain()
    with django_assert_max_num_queries(8):  # key, run, spans, updates, tool calls, child runs (+ last-used touch)
        r = agent.get("/api/v1/runs/big")
    assert r.status_code == 200 and len(r.json()["spans"]) == 5001 and r.json()["usage"]["input_tokens"] == 4999


# --- who may do what ------------------------------------------------------------------------------

ENDPOINTS = [
    ("post", "/api/v1/runs", {"run_id": "r1"}, "ingest"),
    ("post", "/api/v1/runs/r1/spans", {"span_id": "x"}, "ingest"),
    ("patch", "/api/v1/runs/r1/spans/x", {"status": "ok"}, "ingest"),
    ("post", "/api/v1/runs/r1/finish", {}, "ingest"),
    ("get", "/api/v1/runs", None, "read"),
    ("get", "/api/v1/runs/r1", None, "read"),
    ("get", "/api/v1/sessions/sess-1/runs", None, "read"),
]


def _call(client, method, url, body):
    if method == "get":
        return client.get(url)
    return getattr(client, method)(url, data=json.dumps(body), content_type="application/json")


@pytest.mark.parametrize(("method", "url", "body", "scope"), ENDPOINTS)
def test_every_endpoint_refuses_outsiders(project, make_key, key_client, api_client, client_for, charlie,
                                          method, url, body, scope):
    # No credentials, a made-up key, a revoked key: 401.
    assert _call(api_client, method, url, body).status_code == 401
    bogus = key_client("cp_live_" + "x" * 40)
    assert _call(bogus, method, url, body).json()["error_code"] == "invalid_api_key"
    key, raw = make_key(project)
    project_services.api_key_revoke(key=key, actor=None)
    r = _call(key_client(raw), method, url, body)
    assert r.status_code == 401 and r.json()["error_code"] == "api_key_revoked"
    # A key without the scope: 403.
    other_scope = "read" if scope == "ingest" else "ingest"
    r = _call(key_client(make_key(project, scopes=[other_scope])[1]), method, url, body)
    assert r.status_code == 403 and r.json()["error_code"] == "missing_scope"
    if scope == "ingest":
        # People do not write to the run log; agents do, with keys.
        r = _call(client_for(charlie), method, url, body)
        assert r.status_code == 403 and r.json()["error_code"] == "api_key_required"
    assert IngestBatch.objects.count() == 0


def test_reads_are_scoped_to_the_callers_projects(project, other_project, make_key, key_client, client_for,
                                                  alice, bob, charlie):
    ours = key_client(make_key(project)[1])
    theirs = key_client(make_key(other_project)[1])
    build_run(ours)
    drain()
    for outsider in (theirs, client_for(charlie)):
        r = outsider.get("/api/v1/runs/r1")
        assert r.status_code == 404 and r.json()["error_code"] == "not_found"
        assert outsider.get("/api/v1/runs").json()["results"] == []
        assert outsider.get("/api/v1/sessions/sess-1/runs").json()["results"] == []
    assert theirs.get("/api/v1/runs/r1?project=acme").status_code == 404
    # The auditor (bob) and the admin (alice) read it through their session.
    for person in (bob, alice):
        c = client_for(person)
        assert c.get("/api/v1/runs/r1").json()["span_count"] == 7
        assert [r["id"] for r in c.get("/api/v1/runs").json()["results"]] == ["r1"]


def test_another_projects_key_writing_the_same_run_id_touches_only_its_own_project(project, other_project, make_key,
                                                                                  key_client):
    ours = key_client(make_key(project)[1])
    theirs = key_client(make_key(other_project)[1])
    build_run(ours)
    assert post(theirs, "/api/v1/runs/r1/finish", {"status": "failed", "error_code": "sabotage"}).status_code == 202
    assert post(theirs, "/api/v1/runs/r1/spans", {"span_id": "llm1", "usage": {"input_tokens": 10**6}}
                ).status_code == 202
    drain()
    run = ours.get("/api/v1/runs/r1").json()
    assert run["status"] == "completed" and run["usage"]["input_tokens"] == 2000 and run["error_code"] == ""
    theirs_run = theirs.get("/api/v1/runs/r1").json()
    assert theirs_run["status"] == "failed" and theirs_run["span_count"] == 1
    assert ToolCall.objects.filter(project=project).count() == 2 and ToolCall.objects.filter(
        project=other_project).count() == 0


def test_a_person_seeing_two_projects_with_the_same_run_id_is_asked_which(project, other_project, make_key, key_client,
                                                                          client_for, alice):
    from apps.projects.models import Role
    project_services.role_grant(project=other_project, user=alice, role=Role.AUDITOR, actor=None)
    for p in (project, other_project):
        post(key_client(make_key(p)[1]), "/api/v1/runs", {"run_id": "same"})
    drain()
    c = client_for(alice)
    r = c.get("/api/v1/runs/same")
    assert r.status_code == 400 and r.json()["details"]["projects"] == ["acme", "globex"]
    assert c.get("/api/v1/runs/same?project=globex").json()["project"] == "globex"


def test_the_openapi_schema_documents_the_run_log(tmp_path):
    out = tmp_path / "schema.json"
    call_command("spectacular", "--file", str(out), "--format", "openapi-json", "--validate", "--fail-on-warn")
    paths = json.loads(out.read_text())["paths"]
    assert {"/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/spans",
            "/api/v1/runs/{run_id}/spans/{span_id}", "/api/v1/runs/{run_id}/finish",
            "/api/v1/sessions/{session_id}/runs"} <= set(paths)
    assert "202" in paths["/api/v1/runs"]["post"]["responses"]
