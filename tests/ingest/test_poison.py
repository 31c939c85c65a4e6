"""One bad record never costs the good ones, over OTLP: each poison a buggy or hostile agent sent us is
carried in a request with 50 good spans built by the real OpenTelemetry SDK and encoded by its own OTLP
encoder. The answer is either a 4xx naming the field (nothing stored), or 200 with every good span
stored and the poison reported in ``partial_success``; never a 5xx, never a good span lost."""
from __future__ import annotations

import json

import pytest
import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from apps.traces.models import IngestBatch, Run, Span
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = 50


def _sdk_request(poison: dict) -> tuple[bytes, int, str]:
    """The protobuf the SDK's exporter would send: a root, 50 good model calls and the poisoned span.
    Returns (body, trace id, the poisoned span's name)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "poison-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.poison")
    with tracer.start_as_current_span("invoke_agent support", attributes={"gen_ai.operation.name": "invoke_agent"}) \
            as root:
        for i in range(GOOD):
            with tracer.start_as_current_span(f"chat good-{i}", attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 2}):
                pass
        with tracer.start_as_current_span(poison.get("name", "chat poisoned"), attributes={
                "gen_ai.operation.name": "chat", **poison.get("attributes", {})}):
            pass
    provider.shutdown()
    spans = memory.get_finished_spans()
    assert len(spans) == GOOD + 2
    return encode_spans(spans).SerializeToString(), root.get_span_context().trace_id, poison.get("name", "")


def _send(url: str, raw_key: str, body: bytes, content_type: str = "application/x-protobuf") -> requests.Response:
    return requests.post(f"{url}/v1/traces", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {raw_key}", "Content-Type": content_type})


def _stored_names(trace_id: int) -> set[str]:
    return set(Span.objects.filter(trace_id=f"{trace_id:032x}").values_list("name", flat=True))


def _nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_nul_in_a_span_name_rejects_that_span_alone_and_says_so(live_server, project, make_key):
    _, raw = make_key(project, scopes=["ingest"])
    body, trace_id, _ = _sdk_request({"name": "chat nul\x00name"})
    r = _send(live_server.url, raw, body)
    assert r.status_code == 200
    answer = ExportTraceServiceResponse.FromString(r.content)
    assert answer.partial_success.rejected_spans == 1
    assert "name contains the NUL character" in answer.partial_success.error_message
    drain()
    names = _stored_names(trace_id)
    assert len(names) == GOOD + 1 and all(f"chat good-{i}" in names for i in range(GOOD))
    assert not IngestBatch.objects.filter(status="dead").exists()


@pytest.mark.parametrize(("attributes", "check"), [
    # NUL inside an attribute value: stored as U+FFFD, and the span says how many strings were changed.
    ({"app.note": "before\x00after", "app.other": "\x00"},
     lambda span: span.attributes["app.note"] == "before\ufffdafter"
     and span.attributes["controlplane.nul_replaced"] == 2),
    # Token counts past any model's context (the SDK's int64 maximum): kept as attributes, not summed.
    ({"gen_ai.usage.input_tokens": 2**63 - 1},
     lambda span: span.input_tokens is None and span.attributes["gen_ai.usage.input_tokens"] == 2**63 - 1),
    # JSON text the store could not hold once decoded: kept as the text it came as.
    ({"gen_ai.input.messages": json.dumps(_nested(900))},
     lambda span: isinstance(span.input_messages, str) and span.input_messages.startswith("[[[")),
    ({"gen_ai.input.messages": '[{"role": "user", "score": 1e400}]'},
     lambda span: span.input_messages == '[{"role": "user", "score": 1e400}]'),
    ({"gen_ai.input.messages": '[{"role": "user", "content": "nul \\u0000 and half \\udfff"}]'},
     lambda span: isinstance(span.input_messages, str)),
])
def test_a_poisoned_attribute_is_stored_visibly_beside_every_good_span(live_server, project, make_key, attributes,
                                                                     check):
    _, raw = make_key(project, scopes=["ingest"])
    body, trace_id, _ = _sdk_request({"attributes": attributes})
    r = _send(live_server.url, raw, body)
    assert r.status_code == 200
    answer = ExportTraceServiceResponse.FromString(r.content)
    assert answer.partial_success.rejected_spans == 0 and not answer.partial_success.error_message
    drain()
    assert not IngestBatch.objects.filter(status="dead").exists()
    assert len(_stored_names(trace_id)) == GOOD + 2
    poisoned = Span.objects.get(trace_id=f"{trace_id:032x}", name="chat poisoned")
    assert check(poisoned), (poisoned.attributes, poisoned.input_messages, poisoned.input_tokens)
    run = Run.objects.get(trace_id=f"{trace_id:032x}")
    assert run.input_tokens == 10 * GOOD and run.status == "completed"


def test_otlp_json_with_a_lone_surrogate_is_refused_whole_naming_the_field(live_server, project, make_key):
    _, raw = make_key(project, scopes=["ingest"])
    good = [{"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": f"{i + 1:016x}", "name": f"good-{i}",
             "startTimeUnixNano": "1795000000000000000"} for i in range(GOOD)]
    bad = {**good[0], "spanId": "00000000000000ff", "name": "half \udfff"}
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [*good, bad]}]}]}).encode()
    r = _send(live_server.url, raw, body, "application/json")
    assert r.status_code == 400
    assert "spans[50].name" in r.json()["message"] and "surrogate" in r.json()["message"].lower()
    assert not IngestBatch.objects.exists()
