"""The normaliser on its own (pure: no database, no Django): one test per dialect feature."""
from __future__ import annotations

from apps.ingest.normalise import normalise_span, span_kind, trace_records

T0 = 1_795_000_000_000_000_000


def view(attrs: dict, *, name="op", span_id="00000000000000a1", parent="", status=1, events=(), start_ms=0, dur=10,
         message=""):
    return {"trace_id": "0" * 31 + "1", "span_id": span_id, "parent_span_id": parent, "name": name, "kind": 1,
            "start_ns": T0 + start_ms * 1_000_000, "end_ns": T0 + (start_ms + dur) * 1_000_000, "status_code": status,
            "status_message": message, "attributes": attrs, "events": list(events), "resource": {}}


def test_operation_names_map_to_kinds():
    for op, kind in (("chat", "llm"), ("text_completion", "llm"), ("embeddings", "embedding"),
                     ("execute_tool", "tool"), ("invoke_agent", "agent"), ("create_agent", "agent")):
        assert span_kind("x", {"gen_ai.operation.name": op}) == kind
    assert span_kind("x", {"openinference.span.kind": "CHAIN"}) == "chain"
    assert span_kind("x", {"gen_ai.system": "openai"}) == "llm"
    assert span_kind("x", {"http.method": "GET"}) == "other"


def test_deprecated_token_spellings_and_cache_creation():
    span, _ = normalise_span(view({"gen_ai.operation.name": "chat", "gen_ai.system": "anthropic",
                                   "gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": 3,
                                   "gen_ai.usage.cache_creation.input_tokens": 8,
                                   "gen_ai.usage.cache_read.input_tokens": 2,
                                   "gen_ai.usage.reasoning.output_tokens": 1}))
    assert span["provider"] == "anthropic"
    assert span["usage"] == {"input_tokens": 10, "output_tokens": 3, "cache_write_tokens": 8,
                             "cache_read_tokens": 2, "reasoning_tokens": 1}
    assert "attributes" not in span


def test_flattened_prompt_and_completion_attributes():
    span, _ = normalise_span(view({"gen_ai.system": "openai", "gen_ai.prompt.0.role": "user",
                                   "gen_ai.prompt.0.content": "hi", "gen_ai.completion.0.role": "assistant",
                                   "gen_ai.completion.0.content": "hello"}))
    assert span["input_messages"] == [{"role": "user", "content": "hi"}]
    assert span["output_messages"] == [{"role": "assistant", "content": "hello"}]


def test_per_message_events_and_evaluation_result():
    events = [{"name": "gen_ai.system.message", "time_ns": T0, "attributes": {"content": "be nice"}},
              {"name": "gen_ai.user.message", "time_ns": T0, "attributes": {"content": "hi"}},
              {"name": "gen_ai.choice", "time_ns": T0, "attributes": {"message": '{"content": "yo"}',
                                                                      "finish_reason": "stop"}},
              {"name": "gen_ai.evaluation.result", "time_ns": T0, "attributes": {
                  "gen_ai.evaluation.name": "relevance", "gen_ai.evaluation.score.value": 0.8,
                  "gen_ai.evaluation.score.label": "relevant", "gen_ai.evaluation.explanation": "on topic"}}]
    span, _ = normalise_span(view({"gen_ai.operation.name": "chat"}, events=events))
    assert span["input_messages"] == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert span["output_messages"] == [{"role": "assistant", "content": {"content": "yo"}, "finish_reason": "stop"}]
    assert span["details"]["evaluations"] == [{"name": "relevance", "score": 0.8, "label": "relevant",
                                               "explanation": "on topic"}]
    assert [e["name"] for e in span["events"]] == [e["name"] for e in events]  # kept as events too


def test_structured_messages_and_system_instructions():
    span, _ = normalise_span(view({"gen_ai.operation.name": "chat",
                                   "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": "q"}]}],
                                   "gen_ai.system_instructions": "be terse"}))
    assert span["input_messages"][0] == {"role": "system", "parts": [{"type": "text", "content": "be terse"}]}
    assert span["input_messages"][1]["role"] == "user"


def test_agent_totals_are_not_counted_but_kept():
    span, hints = normalise_span(view({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "a",
                                       "gen_ai.agent.version": "3", "gen_ai.usage.input_tokens": 99}))
    assert "usage" not in span and span["attributes"] == {"gen_ai.usage.input_tokens": 99}
    assert span["component"] == "a" and hints["agent_name"] == "a" and hints["agent_version"] == "3"


def test_end_user_and_session_spellings():
    for attrs, user, session in (({"enduser.id": "u1", "session.id": "s1"}, "u1", "s1"),
                                 ({"user.id": "u2", "gen_ai.conversation.id": "c2"}, "u2", "c2")):
        _, hints = normalise_span(view(attrs))
        assert (hints["end_user"], hints["session_id"]) == (user, session)


def test_openinference_tool_call_attributes():
    span, _ = normalise_span(view({"openinference.span.kind": "TOOL", "tool_call.id": "c9",
                                   "tool_call.function.name": "search", "tool_call.function.arguments": '{"q": 1}'},
                                  name="tool"))
    assert span["tool"] == {"name": "search", "call_id": "c9", "arguments": {"q": 1}}


def test_fallback_to_another_model_and_retry_of_the_same_tool_are_inferred():
    failed = view({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.provider.name": "openai",
                   "error.type": "429"}, span_id="00000000000000b1", parent="00000000000000a1", status=2, start_ms=0)
    fallback = view({"gen_ai.operation.name": "chat", "gen_ai.request.model": "claude", "gen_ai.provider.name": "anthropic"},
                    span_id="00000000000000b2", parent="00000000000000a1", start_ms=20)
    records = trace_records([failed, fallback])
    spans = {r["span"]["span_id"]: r["span"] for r in records if r["op"] == "span"}
    assert spans["00000000000000b2"]["fallback_of"] == "00000000000000b1"
    assert spans["00000000000000b1"]["error_code"] == "429"


def test_root_span_starts_and_finishes_the_run_others_only_fill():
    root = view({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "outer"}, name="root")
    inner = view({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "inner", "user.id": "u"},
                 span_id="00000000000000c1", parent="00000000000000a1")
    records = trace_records([inner, root])
    ops = [(r["op"], r.get("fill")) for r in records]
    assert ("run.start", True) in ops and ("run.start", None) in ops and ("run.finish", None) in ops
    start = next(r for r in records if r["op"] == "run.start" and not r.get("fill"))
    assert start["agent_name"] == "outer" and start["run_id"] == "0" * 31 + "1"
    finish = next(r for r in records if r["op"] == "run.finish")
    assert finish["status"] == "completed" and finish["derive_status"] is True


def test_unmapped_attributes_are_kept_verbatim():
    attrs = {"http.route": "/x", "custom.flag": True, "nested": {"a": [1, 2]}}
    span, _ = normalise_span(view({**attrs, "gen_ai.operation.name": "chat"}))
    assert span["attributes"] == attrs


def test_oversized_value_is_cut_visibly_not_dropped():
    span, _ = normalise_span(view({"gen_ai.operation.name": "chat", "gen_ai.input.messages": "x" * 3_000_000}))
    assert span["input_messages"].endswith("[truncated 3000000 characters]")
    assert len(span["input_messages"]) < 300_000


def test_the_size_shortcut_never_lets_an_oversized_field_through():
    """Spans small enough to skip the per-field check (encoded size x 8 under the limit) normalise exactly
    as with the check, for the worst expansions of protobuf into JSON; larger ones are checked and cut."""
    from apps.ingest import normalise, otlp

    from .builders import request, span, trace_id

    limit = normalise.MAX_FIELD_CHARS

    def view_of(values: dict) -> dict:
        (view,) = otlp.span_views(request(span(trace_id(), attributes=values)))
        return view

    def at_the_edge(make) -> dict:
        """A make(n) within 1% of the largest that still takes the shortcut (sizes grow about linearly)."""
        n = 1000
        for _ in range(10):
            size = view_of(make(n))["size"] * 8
            if 0.99 * limit < size <= limit:
                return make(n)
            n = int(n * limit / size * 0.995)
        raise AssertionError("no edge found")

    shortcut = [
        at_the_edge(lambda n: {"custom.map": {"k": "\x01" * n}}),                 # control characters: \u0001
        at_the_edge(lambda n: {"custom.list": [""] * n}),                         # empty strings
        at_the_edge(lambda n: {"custom.flags": [False] * n}),                     # false, false, ...
        at_the_edge(lambda n: {"custom.map": {str(i): "" for i in range(n)}}),    # short keys, empty values
        at_the_edge(lambda n: {"custom.floats": [-1.2345678901234567e-300] * n}),  # doubles at their longest
        at_the_edge(lambda n: {"gen_ai.input.messages": '[{"role": "user", "content": "' + "\\u0001" * n + '"}]'}),
    ]
    checked = [
        {"custom.flags": [False] * (limit // 6)},                                   # over the shortcut: cut
        {"gen_ai.input.messages": "x" * 3_000_000},                                 # oversized text: cut
    ]
    results = []
    for values in shortcut + checked:
        view = view_of(values)
        assert (view["size"] * 8 <= limit) == (values in shortcut)
        fast, _ = normalise_span(view)
        slow, _ = normalise_span({k: v for k, v in view.items() if k != "size"})
        assert fast == slow, list(values)
        results.append(fast)
    assert results[0]["attributes"]["custom.map"]["k"].startswith("\x01\x01")
    assert "truncated" in results[-2]["attributes"]["custom.flags"][-100:]
    assert "truncated" in results[-1]["input_messages"][-100:]
