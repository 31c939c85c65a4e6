"""A loop run (tangle.loop.*) sent by the real OpenTelemetry SDK, read back with its topology."""
from __future__ import annotations

import pytest

from tests.traces.helpers import drain

from .otel import flush, sdk

pytestmark = pytest.mark.django_db(transaction=True)

P = "tangle.loop."


def _chat(tracer, tokens_in: int, tokens_out: int) -> None:
    with tracer.start_as_current_span("chat claude", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4", "gen_ai.usage.input_tokens": tokens_in,
        "gen_ai.usage.output_tokens": tokens_out,
    }):
        pass


def _iteration(tracer, index: int, *, extra: dict, chats: list[tuple[int, int]]) -> int:
    attrs = {P + "iteration.index": index, P + "iteration.placement": "sandbox-a", **extra}
    with tracer.start_as_current_span("loop.iteration", attributes=attrs) as span:
        for tin, tout in chats:
            _chat(tracer, tin, tout)
    return span.get_span_context().span_id


def _move(tracer, kind: str, round_: int, rationale: str, parent: int | None, children: list[int]) -> None:
    attrs = {P + "move.kind": kind, P + "move.round": round_, P + "move.rationale": rationale}
    if parent is not None:
        attrs[P + "move.parent_index"] = parent
    if children:
        attrs[P + "move.child_indices"] = children
    with tracer.start_as_current_span("loop.move", attributes=attrs):
        pass


def _loop_trace(tracer, *, with_moves: bool) -> int:
    with tracer.start_as_current_span("loop", attributes={
        P + "driver": "dynamic", P + "winner_index": 3, P + "total_cost_usd": 0.42,
        P + "duration_ms": 5400.0, P + "iterations": 4, "enduser.id": "dev-7",
    }) as root:
        if with_moves:
            _move(tracer, "fanout", 0, "three plans disagree; try all", None, [0, 1, 2])
        _iteration(tracer, 0, chats=[(100, 10)], extra={
            P + "iteration.group_id": "g0", P + "iteration.verdict.valid": False, P + "iteration.verdict.score": 0.2,
            P + "iteration.cost_usd": 0.05, P + "iteration.tokens_in": 111, P + "iteration.tokens_out": 11,
            P + "iteration.error": "tests failed: 3 of 12"})
        _iteration(tracer, 1, chats=[(200, 20), (300, 30)], extra={
            P + "iteration.group_id": "g0", P + "iteration.verdict.valid": True, P + "iteration.verdict.score": 0.7,
            P + "iteration.cost_usd": 0.12, P + "iteration.output_preview": "patch v1"})
        _iteration(tracer, 2, chats=[(50, 5)], extra={
            P + "iteration.group_id": "g0", P + "iteration.verdict.valid": False, P + "iteration.cost_usd": 0.03})
        if with_moves:
            _move(tracer, "refine", 1, "branch 2 is closest; fix its failing test", 1, [3])
        _iteration(tracer, 3, chats=[(400, 40)], extra={
            P + "iteration.parent_index": 1, P + "iteration.verdict.valid": True, P + "iteration.verdict.score": 0.95,
            P + "iteration.cost_usd": 0.22, P + "iteration.output_preview": "patch v2", P + "iteration.agent_run": "r-3"})
        if with_moves:
            _move(tracer, "stop", 2, "all tests pass", 3, [])
    return root.get_span_context().trace_id


def _read(api_client, read_raw, trace_id: int) -> dict:
    response = api_client.get(f"/api/v1/runs/{trace_id:032x}", HTTP_AUTHORIZATION=f"Bearer {read_raw}")
    assert response.status_code == 200, response.content
    return response.json()


def test_loop_run_reads_back_with_its_topology(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw, service="loop-service")
    trace_id = _loop_trace(tracer, with_moves=True)
    flush(provider, exporter)
    drain()

    run = _read(api_client, read_raw, trace_id)
    assert run["status"] == "completed"
    assert run["end_user"] == "dev-7"
    assert run["span_count"] == 1 + 3 + 4 + 5
    assert run["models_used"] == ["claude-sonnet-4"] and run["providers_used"] == ["anthropic"]
    assert run["usage"]["input_tokens"] == 1050 and run["usage"]["output_tokens"] == 105

    [loop] = run["topology"]["loops"]
    root = next(s for s in run["spans"] if s["depth"] == 0)
    assert loop["span_id"] == root["span_id"] and root["kind"] == "loop"
    assert loop["driver"] == "dynamic" and loop["winner_index"] == 3
    assert loop["total_cost_usd"] == 0.42 and loop["declared_iterations"] == 4
    assert loop["inferred"] is False

    nodes = {n["index"]: n for n in loop["nodes"]}
    assert sorted(nodes) == [0, 1, 2, 3]
    assert [n["winner"] for n in loop["nodes"]] == [False, False, False, True]
    assert (nodes[0]["valid"], nodes[0]["score"], nodes[0]["error"]) == (False, 0.2, "tests failed: 3 of 12")
    assert (nodes[0]["tokens_in"], nodes[0]["tokens_out"]) == (111, 11)  # as declared
    assert (nodes[1]["tokens_in"], nodes[1]["tokens_out"]) == (500, 50)  # summed over its two chats
    assert nodes[1]["output_preview"] == "patch v1" and nodes[1]["cost_usd"] == 0.12
    assert nodes[3]["parent_index"] == 1 and nodes[3]["score"] == 0.95 and nodes[3]["agent_run"] == "r-3"
    assert all(n["duration_ms"] is not None and n["duration_ms"] >= 0 for n in loop["nodes"])
    spans = {s["span_id"]: s for s in run["spans"]}
    assert all(spans[n["span_id"]]["kind"] == "loop.iteration" for n in loop["nodes"])

    edges = loop["edges"]
    assert [(e["kind"], e["round"], e["parent_index"], e["child_indices"]) for e in edges] == [
        ("fanout", 0, None, [0, 1, 2]), ("refine", 1, 1, [3]), ("stop", 2, 3, [])]
    assert [e["rationale"] for e in edges] == [
        "three plans disagree; try all", "branch 2 is closest; fix its failing test", "all tests pass"]
    assert not any(e["inferred"] for e in edges)
    assert all(spans[e["span_id"]]["kind"] == "loop.move" for e in edges)


def test_loop_without_moves_gets_inferred_edges(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw)
    trace_id = _loop_trace(tracer, with_moves=False)
    flush(provider, exporter)
    drain()

    [loop] = _read(api_client, read_raw, trace_id)["topology"]["loops"]
    assert loop["inferred"] is True
    assert len(loop["nodes"]) == 4
    # The shared group is a fan-out star from the start; the parent_index a refine.
    assert [(e["kind"], e["parent_index"], e["child_indices"], e["inferred"], e["span_id"]) for e in loop["edges"]] == [
        ("fanout", None, [0, 1, 2], True, None), ("refine", 1, [3], True, None)]


def test_run_without_loops_has_an_empty_topology(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw)
    with tracer.start_as_current_span("plain") as span:
        trace_id = span.get_span_context().trace_id
    flush(provider, exporter)
    drain()
    assert _read(api_client, read_raw, trace_id)["topology"] == {"loops": []}
