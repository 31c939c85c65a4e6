"""The loop topology builder on effective spans (pure: no database)."""
from __future__ import annotations

from apps.traces import topology


def span(span_id, kind, parent=None, loop=None, *, start="2026-11-24T10:00:00+00:00", **extra):
    return {"span_id": span_id, "parent_span_id": parent, "kind": kind, "name": kind, "start_time": start,
            "duration_ms": 10.0, "status": "unset", "details": {"loop": loop} if loop is not None else None,
            "usage": None, **extra}


def t(n: int) -> str:
    return f"2026-11-24T10:00:{n:02d}+00:00"


def test_no_loop_spans_no_loops():
    assert topology.build([span("a", "agent"), span("b", "llm", "a")]) == {"loops": []}


def test_iterations_without_a_loop_span_form_one_inferred_chain():
    spans = [span("a", "agent")] + [span(f"i{n}", "loop.iteration", "a", {"index": n}, start=t(n)) for n in range(3)]
    [loop] = topology.build(spans)["loops"]
    assert loop["span_id"] is None and loop["inferred"] is True
    assert [(e["kind"], e["parent_index"], e["child_indices"], e["round"]) for e in loop["edges"]] == [
        ("refine", 0, [1], 0), ("refine", 1, [2], 1)]


def test_rest_shapes_nested_verdict_string_indices_and_winner_flag():
    spans = [
        span("L", "loop", loop={"driver": "fixed"}),
        span("m", "loop.move", "L", {"kind": "fanout", "round": "0", "child_indices": "0, 1"}, start=t(1)),
        span("i0", "loop.iteration", "L", {"index": 0, "verdict": {"valid": "true", "score": "0.5"}}, start=t(2)),
        span("i1", "loop.iteration", "L", {"index": 1, "winner": True}, start=t(3), status="error",
             status_message="sandbox died"),
    ]
    [loop] = topology.build(spans)["loops"]
    assert loop["edges"][0]["child_indices"] == [0, 1] and loop["edges"][0]["round"] == 0
    n0, n1 = loop["nodes"]
    assert (n0["valid"], n0["score"], n0["winner"]) == (True, 0.5, False)
    assert n1["winner"] is True and loop["winner_index"] == 1
    assert n1["error"] == "sandbox died"


def test_nested_loops_keep_their_own_iterations_and_tokens_are_summed():
    spans = [
        span("L1", "loop", loop={}),
        span("i0", "loop.iteration", "L1", {"index": 0}, start=t(1)),
        span("L2", "loop", "i0", {}, start=t(2)),
        span("j0", "loop.iteration", "L2", {"index": 0}, start=t(3)),
        span("c", "llm", "j0", start=t(4), usage={"input_tokens": 7, "output_tokens": 3}),
    ]
    loops = {loop["span_id"]: loop for loop in topology.build(spans)["loops"]}
    assert [n["span_id"] for n in loops["L1"]["nodes"]] == ["i0"]
    assert [n["span_id"] for n in loops["L2"]["nodes"]] == ["j0"]
    # The outer iteration's model calls include those of the inner loop under it.
    assert (loops["L1"]["nodes"][0]["tokens_in"], loops["L1"]["nodes"][0]["tokens_out"]) == (7, 3)
    assert loops["L1"]["edges"] == [] and loops["L1"]["inferred"] is True


def test_a_parent_cycle_does_not_hang():
    spans = [span("a", "loop.iteration", "b", {"index": 0}), span("b", "loop.iteration", "a", {"index": 1})]
    [loop] = topology.build(spans)["loops"]
    assert sorted(n["index"] for n in loop["nodes"]) == [0, 1]
