"""Costs of a run sent by the real OpenTelemetry SDK (OTLP/HTTP): GenAI and OpenInference spans priced,
a loop's iteration cost not counted twice over its model calls, re-sending the batch changing nothing."""
from __future__ import annotations

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from opentelemetry.sdk.trace.export import SpanExportResult

from apps.budgets.models import CostDay, SpanCost
from apps.traces.models import Run
from tests.ingest.otel import RecordingExporter, flush, sdk
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db(transaction=True)


def _trace(tracer) -> int:
    with tracer.start_as_current_span("invoke_agent support", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support", "enduser.id": "u-42",
            "gen_ai.usage.input_tokens": 99_999}) as root:  # an agent's own totals: never priced again
        with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 12_000, "gen_ai.usage.cache_read.input_tokens": 8_000,
                "gen_ai.usage.output_tokens": 900}):
            pass
        with tracer.start_as_current_span("ChatCompletion", attributes={
                "openinference.span.kind": "LLM", "llm.provider": "anthropic",
                "llm.model_name": "claude-sonnet-4-20250514", "llm.token_count.prompt": 10_000,
                "llm.token_count.completion": 1_000, "llm.cost.total": 0.033}):
            pass
        with tracer.start_as_current_span("loop.iteration", attributes={
                "tangle.loop.iteration.index": 0, "tangle.loop.iteration.cost_usd": 0.5}):
            with tracer.start_as_current_span("chat claude", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                    "gen_ai.request.model": "claude-sonnet-4-20250514", "gen_ai.usage.input_tokens": 100_000,
                    "gen_ai.usage.output_tokens": 0}):
                pass
        with tracer.start_as_current_span("loop.iteration", attributes={
                "tangle.loop.iteration.index": 1, "tangle.loop.iteration.cost_usd": 0.25}):
            pass  # an iteration whose calls are not traced: its own reported cost counts
    return root.get_span_context().trace_id


class KeepingExporter(RecordingExporter):
    def export(self, spans):
        self.sent = [*getattr(self, "sent", []), *spans]
        return super().export(spans)


def _figures():
    return (sorted(Run.objects.values_list("run_id", "cost_usd")),
            sorted(SpanCost.objects.values_list("kind", "model", "source", "cost_nanos", "reported_nanos")),
            sorted(CostDay.objects.values_list("day", "agent_name", "model", "cost_nanos", "calls")))


def test_an_otlp_run_is_priced_rolled_up_and_read_back(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest", "read"])
    provider, tracer, exporter = sdk(live_server.url, raw, exporter_cls=KeepingExporter)
    trace_id = _trace(tracer)
    flush(provider, exporter)
    drain()

    run = Run.objects.get(run_id=f"{trace_id:032x}")
    assert run.agent_name == "support" and run.end_user == "u-42"
    # gpt-4o $0.029 + reported $0.033 + claude $0.30 + the untraced iteration's reported $0.25.
    assert run.cost_usd == Decimal("0.612")
    rows = _figures()[1]
    assert ("loop.iteration", "", "reported", 0, 500_000_000) in rows  # kept, not counted over its call
    assert ("loop.iteration", "", "reported", 250_000_000, 250_000_000) in rows
    assert ("llm", "claude-sonnet-4-20250514", "reported", 33_000_000, 33_000_000) in rows

    r = api_client.get("/api/v1/costs", {"group_by": "agent,end_user"}, HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert [(x["agent"], x["end_user"], x["cost_usd"]) for x in r.json()["rows"]] == [
        ("support", "u-42", "0.612000000")]

    before = _figures()
    # The same batch again (an exporter retrying after a lost answer): the same spans, the same ids.
    again = RecordingExporter(endpoint=f"{live_server.url}/v1/traces", headers={"Authorization": f"Bearer {raw}"})
    assert again.export(exporter.sent) is SpanExportResult.SUCCESS
    drain()
    assert _figures() == before
    out = StringIO()
    call_command("costs_rederive", stdout=out, days=400)
    assert "no difference found" in out.getvalue(), out.getvalue()
