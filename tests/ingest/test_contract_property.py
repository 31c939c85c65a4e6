"""Property: every OTLP span the receiver accepts (``span_problem`` is None) normalises into records
that pass the record contract's validation, the same one REST writes pass at the door; so nothing
the receiver acknowledges can fail to store for what it holds. Hypothesis builds the spans from
hostile parts: NUL, surrogate escapes, huge and negative numbers, deep JSON, NaN, empty strings."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.ingest import otlp
from apps.ingest.normalise import trace_records
from apps.traces import records

from .builders import request, span

NASTY_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "\x00", "a\x00b", "\\u0000", "\\udfff", "[" * 200, "{\"a\": 1e400}", "[1e400]",
                     "[NaN]", "[\"\\u0000\"]", "[\"\\ud800\"]", json.dumps([[[[["deep"]]]]]),
                     "99999999999999999999999", "-5", "1e30", "gpt-4o", "openai"]),
)
SCALARS = st.one_of(NASTY_TEXT, st.integers(min_value=-(2**63), max_value=2**63 - 1), st.booleans(),
                    st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(NASTY_TEXT, inner, max_size=3)),
                      max_leaves=12)
KEYS = st.one_of(NASTY_TEXT, st.sampled_from([
    "gen_ai.operation.name", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "llm.token_count.prompt",
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.tool.name",
    "gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "input.value", "output.value", "enduser.id",
    "session.id", "gen_ai.agent.name", "gen_ai.request.model", "gen_ai.provider.name", "error.type", "metadata",
    "llm.input_messages.0.message.content", "gen_ai.prompt.0.content", "tangle.loop.iteration.index",
    "openinference.span.kind", "server.address", "server.port", "tool.name", "user.id"]))
OPERATIONS = st.sampled_from(["chat", "execute_tool", "invoke_agent", "embeddings", "LLM", "TOOL", "nonsense"])


@st.composite
def spans(draw):
    attributes = draw(st.dictionaries(KEYS, VALUES, max_size=8))
    if draw(st.booleans()):
        attributes["gen_ai.operation.name"] = draw(OPERATIONS)
    events = draw(st.lists(st.tuples(NASTY_TEXT, st.integers(0, 10), st.dictionaries(KEYS, VALUES, max_size=3)),
                           max_size=3))
    root = span(b"\x01" * 16, b"\x02" * 8, name=draw(NASTY_TEXT) or "root", status=draw(st.integers(0, 2)),
                message=draw(NASTY_TEXT), attributes=attributes, events=events)
    child = span(b"\x01" * 16, b"\x03" * 8, parent=b"\x02" * 8, name=draw(NASTY_TEXT) or "child",
                 start=draw(st.integers(0, 10**6)), status=draw(st.integers(0, 2)),
                 attributes=draw(st.dictionaries(KEYS, VALUES, max_size=8)))
    return [root, child]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans(), st.dictionaries(KEYS, VALUES, max_size=4))
def test_every_accepted_otlp_span_normalises_into_records_the_contract_accepts(otlp_spans, resource):
    req = request(*otlp_spans, resource=resource)
    req = otlp.parse_traces(req.SerializeToString(), otlp.PROTOBUF)  # as stored, then projected
    accepted, _, _ = otlp.count_traces(req)
    recs = trace_records(otlp.span_views(req))
    assert sum(1 for r in recs if r["op"] == "span") == accepted
    for i, rec in enumerate(recs):
        records.validate_record(rec, f"record[{i}]")


def test_the_validation_refuses_what_the_store_cannot_hold():
    """The other half of the property: the check is not vacuous."""
    good = {"op": "span", "run_id": "r", "span": {"span_id": "s", "name": "n", "kind": "llm",
                                                  "start_time": "2026-11-18T00:00:00+00:00"}}
    records.validate_record(good)
    for bad_span in ({"name": "a\x00"}, {"attributes": {"k": float("inf")}}, {"usage": {"input_tokens": 2**63}},
                     {"details": {"a": "\udfff"}}, {"input_messages": _deep(80)}):
        try:
            records.validate_record({**good, "span": {**good["span"], **bad_span}})
        except records.RecordError:
            continue
        raise AssertionError(f"{bad_span!r} passed")


def _deep(n: int):
    value: list = []
    for _ in range(n):
        value = [value]
    return value
