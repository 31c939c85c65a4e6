"""The real OpenTelemetry SDK → our OTLP/HTTP receiver (a running server) → the run log → the REST API."""
from __future__ import annotations

import json

import pytest
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.traces.helpers import drain

from .otel import flush, sdk

pytestmark = pytest.mark.django_db(transaction=True)


def _run(api_client, read_raw, trace_id: int) -> dict:
    response = api_client.get(f"/api/v1/runs/{trace_id:032x}", HTTP_AUTHORIZATION=f"Bearer {read_raw}")
    assert response.status_code == 200, response.content
    return response.json()


def _agent_trace(tracer, *, retry: bool) -> tuple[int, dict]:
    ids = {}
    with tracer.start_as_current_span("invoke_agent support-bot", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support-bot", "gen_ai.agent.id": "agt_1",
        "gen_ai.agent.version": "2.1", "enduser.id": "user-42", "session.id": "sess-9",
        "gen_ai.provider.name": "openai", "gen_ai.usage.input_tokens": 250, "gen_ai.usage.output_tokens": 60,
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "Where is my order?"}]}]),
    }) as root:
        ids["root"] = root.get_span_context().span_id
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 20, "gen_ai.usage.cache_read.input_tokens": 30,
            "gen_ai.usage.reasoning.output_tokens": 5, "gen_ai.request.temperature": 0.2,
            "gen_ai.system_instructions": json.dumps([{"type": "text", "content": "You are a support agent."}]),
            "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "Where is my order?"}]}]),
            "server.address": "api.openai.com", "server.port": 443,
        }) as chat1:
            ids["chat1"] = chat1.get_span_context().span_id
        with tracer.start_as_current_span("execute_tool lookup_order", attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
            "gen_ai.tool.call.id": "call_1", "gen_ai.tool.call.arguments": '{"order": "A-17"}',
            "error.type": "TimeoutError",
        }) as tool1:
            ids["tool1"] = tool1.get_span_context().span_id
            tool1.record_exception(TimeoutError("order service timed out"))
            tool1.set_status(Status(StatusCode.ERROR, "order service timed out"))
        if retry:
            with tracer.start_as_current_span("execute_tool lookup_order", attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
                "gen_ai.tool.call.id": "call_2", "gen_ai.tool.call.arguments": '{"order": "A-17"}',
                "gen_ai.tool.call.result": '{"status": "shipped"}',
            }) as tool2:
                ids["tool2"] = tool2.get_span_context().span_id
                tool2.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.prompt_tokens": 150, "gen_ai.usage.completion_tokens": 40,
            "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "It shipped."}],
                                                   "finish_reason": "stop"}]),
        }) as chat2:
            ids["chat2"] = chat2.get_span_context().span_id
        root.set_status(Status(StatusCode.OK))
        trace_id = root.get_span_context().trace_id
    return trace_id, ids


def test_genai_agent_trace_reads_back(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw, service="support-service")
    trace_id, ids = _agent_trace(tracer, retry=True)
    flush(provider, exporter)
    drain()

    run = _run(api_client, read_raw, trace_id)
    assert run["trace_id"] == f"{trace_id:032x}"
    assert run["agent"] == {"name": "support-bot", "version": "2.1"}
    assert run["end_user"] == "user-42"
    assert run["session_id"] == "sess-9"
    assert run["status"] == "completed"
    assert run["failing_span_id"] == ""
    # The agent span's own totals are not counted again: only the two model calls are.
    assert run["usage"]["input_tokens"] == 250
    assert run["usage"]["output_tokens"] == 60
    assert run["usage"]["cache_read_tokens"] == 30
    assert run["usage"]["reasoning_tokens"] == 5
    assert set(run["models_used"]) == {"gpt-4o", "gpt-4o-2024-08-06"}
    assert run["providers_used"] == ["openai"]
    assert run["span_count"] == 5
    assert run["error_span_count"] == 1
    assert run["metadata"]["agent_id"] == "agt_1"
    assert run["metadata"]["resource"]["service.name"] == "support-service"
    assert "Where is my order?" in json.dumps(run["input"])
    assert "It shipped." in json.dumps(run["output"]) or run["output"] is None

    spans = {s["span_id"]: s for s in run["spans"]}
    root = spans[f"{ids['root']:016x}"]
    assert root["kind"] == "agent" and root["depth"] == 0 and len(root["children"]) == 4
    chat1 = spans[f"{ids['chat1']:016x}"]
    assert chat1["kind"] == "llm" and chat1["depth"] == 1
    assert chat1["provider"] == "openai" and chat1["model"] == "gpt-4o"
    assert chat1["response_model"] == "gpt-4o-2024-08-06"
    assert chat1["endpoint"] == "api.openai.com:443"
    assert chat1["input_messages"][0]["role"] == "system"
    assert chat1["attributes"] == {"gen_ai.request.temperature": 0.2}
    chat2 = spans[f"{ids['chat2']:016x}"]
    assert chat2["provider"] == "openai"  # the deprecated gen_ai.system
    assert chat2["usage"]["input_tokens"] == 150 and chat2["usage"]["output_tokens"] == 40
    tool1, tool2 = spans[f"{ids['tool1']:016x}"], spans[f"{ids['tool2']:016x}"]
    assert tool1["status"] == "error" and tool1["error_code"] == "TimeoutError"
    assert any(e["name"] == "exception" for e in tool1["events"])
    assert tool2["retry_of"] == tool1["span_id"]

    calls = sorted(run["tool_calls"], key=lambda c: c["call_id"])
    assert [(c["name"], c["status"], c["call_id"]) for c in calls] == [
        ("lookup_order", "error", "call_1"), ("lookup_order", "ok", "call_2")]
    assert calls[0]["arguments"] == {"order": "A-17"}
    assert calls[1]["result"] == {"status": "shipped"}
    assert calls[0]["error"] == "order service timed out"


def test_unrecovered_error_fails_the_run_and_names_the_span(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw)
    trace_id, ids = _agent_trace(tracer, retry=False)
    flush(provider, exporter)
    drain()
    run = _run(api_client, read_raw, trace_id)
    assert run["status"] == "failed"
    assert run["failing_span_id"] == f"{ids['tool1']:016x}"


def test_same_batch_three_times_counts_once(live_server, project, make_key, api_client):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from .otel import RecordingExporter

    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace_id, _ = _agent_trace(provider.get_tracer("t"), retry=True)
    spans = memory.get_finished_spans()
    exporter = RecordingExporter(endpoint=f"{live_server.url}/v1/traces", headers={"x-api-key": raw})
    for _ in range(3):
        exporter.export(spans)
        drain()
    assert len(exporter.results) == 3 and all(r.name == "SUCCESS" for r in exporter.results)
    run = _run(api_client, read_raw, trace_id)
    assert run["span_count"] == 5
    assert run["usage"]["input_tokens"] == 250 and run["usage"]["output_tokens"] == 60
    assert len(run["tool_calls"]) == 2
