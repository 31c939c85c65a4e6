"""The real OpenTelemetry SDK sends an email, a card number and an API key in prompts, tool arguments,
attributes and a log record; none of them is stored, and the raw batches are gone once projected."""
from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

from apps.traces.models import IngestBatch
from tests.traces.helpers import drain
from tests.traces.store_scan import stored_text

from .otel import flush, sdk

pytestmark = pytest.mark.django_db(transaction=True)

EMAIL, CARD, KEY = "jane.doe@example.com", "5555-5555-5555-4444", "sk-proj-Zx81KqPpL2mN4vB7cX9dE3fG"


def test_pii_sent_through_the_sdk_is_never_stored(live_server, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    provider, tracer, exporter = sdk(live_server.url, raw)
    log_provider = LoggerProvider()
    log_provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(
        endpoint=f"{live_server.url}/v1/logs", headers={"Authorization": f"Bearer {raw}"}, timeout=10)))
    logger = logging.getLogger("tests.redaction.agent")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = LoggingHandler(logger_provider=log_provider)
    logger.addHandler(handler)
    try:
        with tracer.start_as_current_span("invoke_agent billing", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "billing", "enduser.id": "user-7",
            "app.customer_contact": EMAIL,
        }) as root:
            with tracer.start_as_current_span("chat gpt-4o", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [
                    {"type": "text", "content": f"I'm {EMAIL}; bill card {CARD}; my key is {KEY}"}]}]),
                "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 8,
            }) as chat:
                logger.info("user wrote from %s with card %s", EMAIL, CARD)
                chat_id = chat.get_span_context().span_id
            with tracer.start_as_current_span("execute_tool charge", attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "charge",
                "gen_ai.tool.call.arguments": json.dumps({"card": CARD, "email": EMAIL, "api_key": KEY}),
            }):
                pass
            trace_id = root.get_span_context().trace_id
    finally:
        logger.removeHandler(handler)
        log_provider.shutdown()
    flush(provider, exporter)
    drain()

    text = stored_text(project)
    for secret in (EMAIL, CARD, KEY, CARD.replace("-", "")):
        assert secret not in text
    assert not IngestBatch.objects.filter(project=project).exclude(raw=None).exists()

    run = api_client.get(f"/api/v1/runs/{trace_id:032x}", HTTP_AUTHORIZATION=f"Bearer {read_raw}").json()
    assert run["end_user"] == "user-7"
    spans = {s["name"]: s for s in run["spans"]}
    assert spans["invoke_agent billing"]["attributes"]["app.customer_contact"] == "[EMAIL]"
    chat = spans["chat gpt-4o"]
    assert chat["span_id"] == f"{chat_id:016x}"
    assert chat["input_messages"][0]["parts"][0]["content"] == "I'm [EMAIL]; bill card [CARD]; my key is [API_KEY]"
    assert any(e["attributes"].get("body") == "user wrote from [EMAIL] with card [CARD]" for e in chat["events"])
    assert spans["execute_tool charge"]["tool"]["arguments"] == {"card": "[CARD]", "email": "[EMAIL]",
                                                                 "api_key": "[API_KEY]"}
