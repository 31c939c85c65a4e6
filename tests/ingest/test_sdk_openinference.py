"""An OpenInference-instrumented agent (the spellings Arize's instrumentors emit), sent by the real SDK."""
from __future__ import annotations

import json

import pytest
from opentelemetry.trace import Status, StatusCode

from tests.traces.helpers import drain

from .otel import flush, sdk

pytestmark = pytest.mark.django_db(transaction=True)


def test_openinference_trace_reads_back(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw, service="rag-service")
    with tracer.start_as_current_span("research_agent", attributes={
        "openinference.span.kind": "AGENT", "agent.name": "researcher", "session.id": "s-oi", "user.id": "u-oi",
        "input.value": "Summarise the paper", "metadata": json.dumps({"tenant": "t1"}), "tag.tags": ["beta"],
        "graph.node.id": "agent", "graph.node.name": "researcher",
    }) as root:
        with tracer.start_as_current_span("ChatAnthropic", attributes={
            "openinference.span.kind": "LLM", "llm.model_name": "claude-sonnet-4", "llm.provider": "anthropic",
            "llm.system": "anthropic", "llm.token_count.prompt": 900, "llm.token_count.completion": 120,
            "llm.token_count.total": 1020, "llm.token_count.prompt_details.cache_read": 600,
            "llm.token_count.prompt_details.cache_write": 100, "llm.token_count.completion_details.reasoning": 40,
            "llm.input_messages.0.message.role": "system", "llm.input_messages.0.message.content": "Be brief.",
            "llm.input_messages.1.message.role": "user", "llm.input_messages.1.message.content": "Summarise",
            "llm.output_messages.0.message.role": "assistant",
            "llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "fetch_paper",
            "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": '{"id": "2401.1"}',
            "llm.invocation_parameters": '{"temperature": 0}',
        }) as llm:
            llm_id = llm.get_span_context().span_id
        with tracer.start_as_current_span("fetch_paper", attributes={
            "openinference.span.kind": "TOOL", "tool.name": "fetch_paper", "tool_call.id": "toolu_1",
            "input.value": '{"id": "2401.1"}', "output.value": '{"title": "A paper"}',
        }) as tool:
            tool_id = tool.get_span_context().span_id
        with tracer.start_as_current_span("retrieve", attributes={"openinference.span.kind": "RETRIEVER"}):
            pass
        root.set_attribute("output.value", "It is about X.")
        root.set_status(Status(StatusCode.OK))
        trace_id = root.get_span_context().trace_id
    flush(provider, exporter)
    drain()

    response = api_client.get(f"/api/v1/runs/{trace_id:032x}", HTTP_AUTHORIZATION=f"Bearer {read_raw}")
    assert response.status_code == 200
    run = response.json()
    assert run["agent"]["name"] == "researcher"
    assert (run["end_user"], run["session_id"], run["status"]) == ("u-oi", "s-oi", "completed")
    assert run["input"] == "Summarise the paper" and run["output"] == "It is about X."
    assert run["metadata"]["tenant"] == "t1" and run["metadata"]["tags"] == ["beta"]
    assert run["usage"] == {**run["usage"], "input_tokens": 900, "output_tokens": 120, "cache_read_tokens": 600,
                            "cache_write_tokens": 100, "reasoning_tokens": 40}
    assert run["models_used"] == ["claude-sonnet-4"] and run["providers_used"] == ["anthropic"]

    spans = {s["span_id"]: s for s in run["spans"]}
    kinds = sorted(s["kind"] for s in spans.values())
    assert kinds == ["agent", "llm", "retriever", "tool"]
    root_span = next(s for s in spans.values() if s["depth"] == 0)
    assert root_span["details"]["graph_node"] == {"id": "agent", "name": "researcher"}
    llm_span = spans[f"{llm_id:016x}"]
    assert llm_span["input_messages"] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Summarise"}]
    call = llm_span["output_messages"][0]["tool_calls"][0]
    assert call == {"function": {"name": "fetch_paper", "arguments": {"id": "2401.1"}}}
    assert llm_span["attributes"] == {"llm.invocation_parameters": '{"temperature": 0}'}  # unmapped: verbatim
    tool_span = spans[f"{tool_id:016x}"]
    assert tool_span["tool"]["name"] == "fetch_paper" and tool_span["tool"]["call_id"] == "toolu_1"
    assert run["tool_calls"][0]["arguments"] == {"id": "2401.1"}
    assert run["tool_calls"][0]["result"] == {"title": "A paper"}
