"""The record contract (``apps.traces.records``): every producer's records pass the one validation and
use only the keys the TypedDicts declare; a broken record of each op is refused at the right field;
the limits are the columns'; and redaction walks a record's free text, not its structure (pure: no
database)."""
from __future__ import annotations

import typing

import pytest

from apps.common.redaction import Redactor
from apps.ingest import otlp
from apps.ingest.normalise import trace_records
from apps.traces import models, records
from apps.traces.records import MAX_CHARS, RecordError, validate_record
from tests.ingest.builders import logs_request, request, span, span_id, trace_id

NOW = "2026-11-18T00:00:00+00:00"


def _rest_records() -> list[dict]:
    """Every op through the REST builders, with every field they know set."""
    return [
        records.run_start_record({
            "run_id": "run-1", "agent": {"name": "billing-bot", "version": "1.2"}, "input": {"q": "hi"},
            "end_user": "u-1", "session_id": "s-1", "parent_run_id": "run-0", "metadata": {"team": "a"},
            "status": "pending", "started_at": NOW}, received_at=NOW),
        records.run_start_record({}, received_at=NOW),
        *records.spans_records("run-1", [
            {"span_id": "llm-1", "kind": "llm", "name": "chat", "start_time": NOW,
             "end_time": "2026-11-18T00:00:01+00:00", "status": "error", "status_message": "overloaded",
             "error_code": "rate_limited", "component": "planner", "action": "plan", "details": {"k": [1]},
             "provider": "openai", "model": "gpt-4o", "response_model": "gpt-4o-2024", "endpoint": "api:443",
             "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_tokens": 1, "cache_write_tokens": 2,
                       "reasoning_tokens": 4, "total_tokens": 13},
             "time_to_first_token_ms": 120.5, "stream": {"chunks": 7, "output_tokens_per_second": 31.5},
             "input_messages": [{"role": "user", "content": "hi"}], "output_messages": "hello",
             "attributes": {"a": 1}, "events": [{"name": "retry", "time": NOW, "attributes": {"n": 1}}]},
            {"span_id": "llm-2", "parent_span_id": "llm-1", "retry_of": "llm-1", "model": "gpt-4o"},
            {"span_id": "tool-1", "fallback_of": "llm-2",
             "tool": {"name": "search", "call_id": "c1", "arguments": {"q": 1}, "result": [1], "error": "none"}},
            {},  # everything inferred
        ], received_at=NOW),
        records.span_update_record("run-1", "tool-1", {"end_time": NOW, "tool": {"result": "late"},
                                                       "usage": {"output_tokens": 1}}, received_at=NOW),
        records.run_finish_record("run-1", {
            "status": "failed", "output": {"a": 1}, "error_code": "boom", "error_details": {"why": "x"},
            "failing_span_id": "llm-1", "ended_at": NOW}, received_at=NOW),
        records.run_finish_record("run-1", {}, received_at=NOW),
    ]


def _otlp_records() -> list[dict]:
    """Every op through the OTLP normaliser, from protobuf requests as the receiver stores them."""
    tid, root, agent, llm, tool, retry = trace_id(), span_id(), span_id(), span_id(), span_id(), span_id()
    req = request(
        span(tid, root, name="invoke_agent", status=1, attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "root-agent", "gen_ai.agent.version": "2",
            "enduser.id": "u-1", "session.id": "s-1", "input.value": "question", "output.value": "answer",
            "metadata": '{"tier": "gold"}', "tag.tags": ["a"]}),
        span(tid, agent, parent=root, name="sub", attributes={
            "openinference.span.kind": "AGENT", "agent.name": "sub-agent", "graph.node.id": "n1"}),
        span(tid, llm, parent=agent, name="chat", status=2, message="overloaded", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024", "server.address": "api.openai.com", "server.port": 443,
            "error.type": "rate_limited", "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 3,
            "gen_ai.usage.cache_read.input_tokens": 1, "gen_ai.usage.cache_creation.input_tokens": 2,
            "gen_ai.usage.reasoning.output_tokens": 4, "gen_ai.system_instructions": "be brief",
            "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]',
            "gen_ai.output.messages": '[{"role": "assistant", "parts": []}]', "custom": "kept"},
             events=[("gen_ai.evaluation.result", 1, {"gen_ai.evaluation.name": "relevance",
                                                      "gen_ai.evaluation.score.value": 0.9}),
                     ("note", 2, {"k": "v"})]),
        span(tid, retry, parent=agent, name="chat", start=20, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}),
        span(tid, tool, parent=agent, name="execute_tool", start=40, status=2, message="timeout", attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search", "gen_ai.tool.call.id": "c1",
            "gen_ai.tool.call.arguments": '{"q": 1}', "gen_ai.tool.call.result": "none"}),
        span(tid, span_id(), parent=agent, name="loop", start=60, attributes={
            "tangle.loop.driver": "refine", "tangle.loop.iteration.index": 0}),
        resource={"service.name": "svc", "deployment.environment": "test"},
    )
    # A trace whose root has not arrived: only a run.start with fill, and its spans.
    orphan = request(span(trace_id(), span_id(), parent=span_id(), name="chat", attributes={
        "gen_ai.system": "anthropic", "user.id": "u-2"}))
    logs = logs_request({"trace_id": tid, "span_id": llm, "event_name": otlp.GENAI_DETAILS_EVENT, "severity": "INFO",
                         "body": {"gen_ai.input.messages": [{"role": "user", "content": "hi"}],
                                  "gen_ai.output.messages": [{"role": "assistant", "content": "yo"}]}},
                        {"trace_id": tid, "span_id": tool, "body": "plain log line"})
    out = []
    for req_ in (req, orphan):
        parsed = otlp.parse_traces(req_.SerializeToString(), otlp.PROTOBUF)
        out += trace_records(otlp.span_views(parsed))
    return out + otlp.log_records(otlp.parse_logs(logs.SerializeToString(), otlp.PROTOBUF))


PRODUCERS = {"rest": _rest_records, "otlp": _otlp_records}


@pytest.mark.parametrize("producer", PRODUCERS)
def test_every_record_a_producer_emits_passes_the_one_validation(producer):
    recs = PRODUCERS[producer]()
    assert {r["op"] for r in recs} == set(records.OPS)  # each op is exercised
    if producer == "otlp":
        assert any(r.get("fill") for r in recs) and any(r.get("derive_status") for r in recs)
    for i, rec in enumerate(recs):
        validate_record(rec, f"{producer}[{i}]")


def _undeclared(value: dict, typed: type, path: str) -> list[str]:
    """Keys of ``value`` (and of the dicts the contract types inside it) that ``typed`` does not declare,
    and required keys it lacks."""
    hints = typing.get_type_hints(typed)
    found = [f"{path}.{k} (undeclared)" for k in value if k not in hints]
    found += [f"{path}.{k} (missing)" for k in typed.__required_keys__ if k not in value]
    for key, hint in hints.items():
        item = value.get(key)
        if typing.is_typeddict(hint) and isinstance(item, dict):
            found += _undeclared(item, hint, f"{path}.{key}")
        elif typing.get_origin(hint) is list and isinstance(item, list):
            (inner,) = typing.get_args(hint)
            for i, element in enumerate(item):
                if typing.is_typeddict(inner) and isinstance(element, dict):
                    found += _undeclared(element, inner, f"{path}.{key}[{i}]")
    return found


@pytest.mark.parametrize("producer", PRODUCERS)
def test_every_key_a_producer_emits_is_declared_in_the_contract(producer):
    """Read from the TypedDicts themselves (not from validate_record), so neither a producer nor the
    validation can drift from the declared contract unnoticed."""
    problems = []
    for i, rec in enumerate(PRODUCERS[producer]()):
        problems += _undeclared(rec, records.RECORD_TYPES[rec["op"]], f"{producer}[{i}]")
    assert problems == []


def test_the_contract_lists_agree_with_the_models():
    def status(typed):
        return typing.get_args(typing.get_type_hints(typed)["status"])

    assert tuple(records.Usage.__annotations__) == models.TOKEN_FIELDS
    assert set(status(records.Span)) == set(models.SpanStatus.values)
    assert status(records.RunStart) == records.RUN_START_STATUSES
    assert status(records.RunFinish) == records.RUN_FINISH_STATUSES
    assert set(records.RUN_START_STATUSES + records.RUN_FINISH_STATUSES) <= set(models.Run.Status.values)
    assert tuple(typing.get_args(records.Record)) == tuple(records.RECORD_TYPES.values())


def test_every_column_a_limit_stands_for_holds_it():
    """``MAX_CHARS["span_id"]`` stands for every span id; ``error_code`` for a span's and a run's."""
    def length(model, name):
        return model._meta.get_field(name).max_length

    for model, name in ((models.Span, "parent_span_id"), (models.Span, "retry_of"), (models.Span, "fallback_of"),
                        (models.Run, "failing_span_id"), (models.SpanUpdate, "span_id")):
        assert length(model, name) >= MAX_CHARS["span_id"], (model, name)
    assert length(models.Run, "error_code") >= MAX_CHARS["error_code"]
    assert length(models.Span, "trace_id") >= MAX_CHARS["trace_id"]
    assert records.ID_RE.fullmatch("a" * MAX_CHARS["run_id"]) and not records.ID_RE.fullmatch("a" * 129)


def test_the_normaliser_cuts_text_at_the_contracts_limits():
    long = "m" * 1000
    req = request(span(trace_id(), span_id(), name="n" * 1000, status=2, message="x" * 20_000, attributes={
        "gen_ai.request.model": long, "gen_ai.provider.name": long, "error.type": long, "gen_ai.agent.name": long,
        "server.address": long}, events=[("e" * 1000, 1, {})]))
    recs = trace_records(otlp.span_views(otlp.parse_traces(req.SerializeToString(), otlp.PROTOBUF)))
    for rec in recs:
        validate_record(rec)
    (sp,) = [r["span"] for r in recs if r["op"] == "span"]
    for key in ("name", "model", "provider", "error_code", "endpoint", "status_message"):
        assert len(sp[key]) == MAX_CHARS[key], key
    assert len(sp["events"][0]["name"]) == MAX_CHARS["event.name"]


BIG = "x" * (records.MAX_FIELD_BYTES + 1)


@pytest.mark.parametrize(("parts", "resource"), [
    ({"attributes": {"metadata": BIG}}, None),
    ({"attributes": {"tag.tags": BIG}}, None),
    ({"attributes": {"graph.node.x": BIG}}, None),
    ({"events": [("e", 1, {"body": BIG})]}, None),
    ({"events": [("e", 1, {"body": "y" * 20_000})] * 60}, None),  # 1.2 MB of events together
    ({"attributes": {"controlplane.retry_of": "not an id"}}, None),
    ({}, {"service.name": "svc", "big": BIG}),
], ids=["metadata", "tags", "graph-node", "event-attribute", "many-events", "retry-of", "resource"])
def test_otlp_edges_are_brought_within_the_contract_by_the_normaliser(parts, resource):
    """Oversized values are cut visibly (a marked string; events beyond the limit counted in a last
    event), and a recovery link that is no span id stays an attribute."""
    req = request(span(trace_id(), span_id(), name="root", **parts), resource=resource)
    for rec in trace_records(otlp.span_views(otlp.parse_traces(req.SerializeToString(), otlp.PROTOBUF))):
        validate_record(rec)


def _good(op: str) -> dict:
    return {
        "run.start": {"op": "run.start", "run_id": "r", "status": "running", "started_at": NOW},
        "span": {"op": "span", "run_id": "r", "span": {"span_id": "s", "name": "n", "kind": "llm", "start_time": NOW}},
        "span.update": {"op": "span.update", "run_id": "r", "span_id": "s", "fields": {"end_time": NOW}},
        "run.finish": {"op": "run.finish", "run_id": "r", "status": "completed", "ended_at": NOW},
    }[op]


def _broken(op: str, path: str, value):
    rec = _good(op)
    node = rec
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return rec


@pytest.mark.parametrize(("op", "path", "value"), [
    ("run.start", "started_at", "yesterday"),
    ("run.start", "status", "completed"),
    ("run.start", "agent_name", "a" * 201),
    ("run.start", "fill", "yes"),
    ("run.start", "agent", {"name": "x"}),  # the REST body's spelling, not the record's
    ("run.start", "trace_id", "t" * 33),
    ("span", "span.span_id", "has space"),
    ("span", "span.name", ""),
    ("span", "span.kind", "robot"),
    ("span", "span.usage", {"input_tokens": -1}),
    ("span", "span.usage", {"total_tokens": 3}),
    ("span", "span.stream", {"chunks": 2**31}),
    ("span", "span.tool", {"name": ""}),
    ("span", "span.attributes", {"k": float("nan")}),
    ("span", "span.events", [{"name": "e", "colour": "red"}]),
    ("span", "span.duration_ms", 5),
    ("span.update", "span_id", ""),
    ("span.update", "fields", {"end_time": "2026-11-18T00:00:00"}),
    ("span.update", "fields", {"span_id": "other"}),
    ("span.update", "at", "later"),
    ("run.finish", "status", "done"),
    ("run.finish", "ended_at", "1969-12-31T23:59:59+00:00"),
    ("run.finish", "output", "\x00"),
    ("run.finish", "failing_span_id", "s" * 65),
    ("run.finish", "derive_status", 1),
])
def test_a_broken_record_of_each_op_is_refused_at_its_field(op, path, value):
    validate_record(_good(op))
    with pytest.raises(RecordError) as caught:
        validate_record(_broken(op, path, value))
    expected = {
        "span.usage": "record.span.usage.", "span.stream": "record.span.stream.chunks",
        "span.tool": "record.span.tool.name", "span.attributes": "record.span.attributes",
        "span.events": "record.span.events[0].colour",
    }.get(path)
    if path == "fields":
        expected = "record.fields."
    assert caught.value.field.startswith(expected or f"record.{path}"), caught.value.field


def test_a_record_without_a_known_op_is_refused_at_op():
    with pytest.raises(RecordError) as caught:
        validate_record({"op": "run.delete", "run_id": "r"})
    assert caught.value.field == "record.op"


# --- redaction of a record -------------------------------------------------------------------------------


def test_records_redact_free_text_and_keep_structure():
    redactor = Redactor(exempt_attributes=["http.client_ip", "debug.*"])
    span_rec = {"op": "span", "run_id": "r1", "span": {
        "span_id": "s1", "kind": "tool", "name": "email bob@example.com", "model": "gpt-4o",
        "start_time": "2026-01-01T00:00:00+00:00", "status": "ok",
        "tool": {"name": "send_mail", "call_id": "call_1", "arguments": {"to": "bob@example.com", "cc": ["a@b.io"]},
                 "result": "sent with key sk-abcdefghijklmnopqrstuvwxyz"},
        "input_messages": [{"role": "user", "content": "my card is 4111111111111111"}],
        "attributes": {"http.client_ip": "203.0.113.7", "net.peer.ip": "203.0.113.8", "debug.raw": "x@y.com",
                       "count": 3},
        "events": [{"name": "log", "attributes": {"body": "call +1 415 555 2671"}}],
    }}
    out = records.redact(span_rec, redactor)["span"]
    assert out["name"] == "email [EMAIL]"
    assert out["tool"] == {"name": "send_mail", "call_id": "call_1",
                           "arguments": {"to": "[EMAIL]", "cc": ["[EMAIL]"]}, "result": "sent with key [API_KEY]"}
    assert out["input_messages"][0]["content"] == "my card is [CARD]"
    assert out["attributes"] == {"http.client_ip": "203.0.113.7", "net.peer.ip": "[IP]", "debug.raw": "x@y.com",
                                 "count": 3}
    assert out["events"][0]["attributes"]["body"] == "call [PHONE]"
    assert out["model"] == "gpt-4o" and out["span_id"] == "s1"
    assert span_rec["span"]["name"] == "email bob@example.com"  # the record given is not changed

    start = records.redact({"op": "run.start", "run_id": "r1", "end_user": "u@example.com",
                            "input": {"q": "reach me at u@example.com"}, "metadata": {"ip": "10.1.2.3"}}, redactor)
    assert start["end_user"] == "u@example.com"  # the attribution the sender chose
    assert start["input"] == {"q": "reach me at [EMAIL]"} and start["metadata"] == {"ip": "[IP]"}
    finish = records.redact({"op": "run.finish", "run_id": "r1", "output": "done, AKIAIOSFODNN7EXAMPLE",
                             "error_details": {"peer": "2001:db8::1:0:0:1"}}, redactor)
    assert finish["output"] == "done, [API_KEY]" and finish["error_details"] == {"peer": "[IP]"}
    update = records.redact({"op": "span.update", "run_id": "r1", "span_id": "s1",
                             "fields": {"status_message": "mail x@y.io", "end_time": NOW}}, redactor)
    assert update["fields"] == {"status_message": "mail [EMAIL]", "end_time": NOW}


@pytest.mark.parametrize("producer", PRODUCERS)
def test_a_redacted_record_still_passes_the_validation(producer):
    redactor = Redactor([{"name": "EMPLOYEE_ID", "pattern": r"EMP-\d{6}"}])
    for rec in PRODUCERS[producer]():
        validate_record(records.redact(rec, redactor))


def _otlp_span_record(**parts) -> dict:
    req = request(span(trace_id(), span_id(), name="root", **parts))
    recs = trace_records(otlp.span_views(otlp.parse_traces(req.SerializeToString(), otlp.PROTOBUF)))
    return next(r["span"] for r in recs if r["op"] == "span")


def test_events_past_the_limit_are_counted_not_dropped_silently():
    stored = _otlp_span_record(events=[("e", 1, {"body": "y" * 20_000})] * 60)
    assert isinstance(stored["events"], list) and 0 < len(stored["events"]) < 61
    marker = stored["events"][-1]
    assert marker["name"] == "controlplane.events_truncated"
    assert marker["attributes"]["dropped"] == 61 - len(stored["events"])


def test_a_recovery_link_that_is_no_span_id_stays_an_attribute():
    stored = _otlp_span_record(attributes={"controlplane.retry_of": "not an id"})
    assert "retry_of" not in stored and stored["attributes"]["controlplane.retry_of"] == "not an id"
