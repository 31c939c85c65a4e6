"""POST /v1/traces and /v1/logs, exact to the OTLP/HTTP specification: every status code it answers."""
from __future__ import annotations

import gzip
import json
import zlib

import pytest
from django.test import Client
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from apps.traces.models import IngestBatch, Span
from tests.traces.helpers import drain

from . import builders as b

pytestmark = pytest.mark.django_db

PB = "application/x-protobuf"


@pytest.fixture
def key(project, make_key):
    return make_key(project, scopes=["ingest"])[1]


def post(body: bytes, key: str | None, *, path="/v1/traces", content_type=PB, **headers):
    extra = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    extra.update(headers)
    return Client().post(path, data=body, content_type=content_type, **extra)


def status_of(response) -> status_pb2.Status:
    if response["Content-Type"].startswith("application/json"):
        return json_format.Parse(response.content, status_pb2.Status())
    return status_pb2.Status.FromString(response.content)


def one_trace():
    tid = b.trace_id()
    root = b.span(tid, name="invoke_agent bot", attributes={"gen_ai.operation.name": "invoke_agent",
                                                           "gen_ai.agent.name": "bot"})
    child = b.span(tid, parent=root.span_id, name="chat m", start=1, attributes={
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 7})
    return tid, b.request(root, child)


def test_protobuf_request_is_stored_and_answered_in_protobuf(key):
    tid, req = one_trace()
    response = post(req.SerializeToString(), key)
    assert response.status_code == 200
    assert response["Content-Type"] == PB
    assert not ExportTraceServiceResponse.FromString(response.content).HasField("partial_success")
    batch = IngestBatch.objects.get()
    assert (batch.kind, batch.source, batch.item_count) == ("otlp.traces", "otlp", 2)
    drain()
    assert Span.objects.filter(trace_id=tid.hex()).count() == 2
    assert IngestBatch.objects.get().raw is None  # the raw batch is gone once projected


def test_otlp_json_hex_ids_integer_enums_unknown_fields(key):
    tid, sid = b.trace_id(), b.span_id()
    body = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "j"}}]},
                               "someFutureField": 1,
                               "scopeSpans": [{"scope": {"name": "s"}, "spans": [{
                                   "traceId": tid.hex(), "spanId": sid.hex(), "name": "chat x", "kind": 3,
                                   "startTimeUnixNano": str(b.T0), "endTimeUnixNano": str(b.T0 + 5_000_000),
                                   "status": {"code": 2, "message": "boom"}, "unknownSpanField": {"a": 1},
                                   "attributes": [{"key": "gen_ai.request.model", "value": {"stringValue": "x"}},
                                                  {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "12"}}],
                               }]}]}]}
    response = post(json.dumps(body).encode(), key, content_type="application/json")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content) == {}
    drain()
    stored = Span.objects.get(trace_id=tid.hex())
    assert stored.span_id == sid.hex() and stored.status == "error" and stored.status_message == "boom"
    assert stored.request_model == "x" and stored.input_tokens == 12 and stored.kind == "llm"


def test_gzip_and_deflate_bodies(key):
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        tid, req = one_trace()
        response = post(compress(req.SerializeToString()), key, HTTP_CONTENT_ENCODING=encoding)
        assert response.status_code == 200, (encoding, response.content)
    drain()
    assert Span.objects.count() == 4


def test_empty_request_is_200_and_stores_nothing(key):
    for body in (b"", b.request().SerializeToString()):
        response = post(body, key)
        assert response.status_code == 200
    response = post(b"{}", key, content_type="application/json")
    assert response.status_code == 200 and json.loads(response.content) == {}
    assert not IngestBatch.objects.exists()


@pytest.mark.parametrize("content_type", [PB, "application/json"])
def test_undecodable_body_is_400_with_a_google_rpc_status(key, content_type):
    response = post(b"\xff\xff\xff not otlp", key, content_type=content_type)
    assert response.status_code == 400
    assert response["Content-Type"] == content_type
    status = status_of(response)
    assert status.code == 3 and "not" in status.message  # INVALID_ARGUMENT, in English
    assert response["X-Error-Code"] == "parse_error"
    assert not IngestBatch.objects.exists()


def test_bad_spans_are_rejected_partially_and_the_valid_ones_kept(key):
    tid = b.trace_id()
    good = b.span(tid, name="fine")
    short_id = b.span(tid, name="short ids")
    short_id.trace_id = b"\x01" * 8
    backwards = b.span(tid, name="backwards")
    backwards.end_time_unix_nano = backwards.start_time_unix_nano - 1
    nameless = b.span(tid, name="")
    response = post(b.request(good, short_id, backwards, nameless).SerializeToString(), key)
    assert response.status_code == 200
    partial = ExportTraceServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_spans == 3
    assert partial.error_message.startswith("3 spans rejected; the first: span ")
    assert "trace_id must be 16 bytes" in partial.error_message
    assert IngestBatch.objects.get().item_count == 1
    drain()
    assert list(Span.objects.values_list("name", flat=True)) == ["fine"]


def test_all_spans_rejected_stores_nothing(key):
    bad = b.span(b.trace_id(), name="")
    response = post(b.request(bad).SerializeToString(), key)
    assert response.status_code == 200
    assert ExportTraceServiceResponse.FromString(response.content).partial_success.rejected_spans == 1
    assert not IngestBatch.objects.exists()


def test_body_over_20_mib_is_413(key, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
    response = post(b"\x00" * (1024 * 1024 + 1), key)
    assert response.status_code == 413
    assert status_of(response).message.startswith("The body is larger")


def test_gzip_bomb_is_413_while_decompressing(key):
    # 64 MiB of zeros in ~64 KiB: refused once 20 MiB come out, never inflated whole.
    bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 200_000
    response = post(bomb, key, HTTP_CONTENT_ENCODING="gzip")
    assert response.status_code == 413
    assert "decompressed" in status_of(response).message
    assert not IngestBatch.objects.exists()


def test_truncated_or_corrupt_gzip_is_400(key):
    _, req = one_trace()
    body = gzip.compress(req.SerializeToString())
    assert post(body[: len(body) // 2], key, HTTP_CONTENT_ENCODING="gzip").status_code == 400
    assert post(b"not gzip at all", key, HTTP_CONTENT_ENCODING="gzip").status_code == 400


def test_auth_401_without_or_with_a_bad_key_403_without_the_ingest_scope(project, make_key, alice):
    _, req = one_trace()
    body = req.SerializeToString()
    response = post(body, None)
    assert response.status_code == 401 and response["WWW-Authenticate"].startswith("Bearer")
    assert status_of(response).code == 16
    assert post(body, "cp_" + "x" * 40).status_code == 401
    _, read_only = make_key(project, scopes=["read"])
    response = post(body, read_only)
    assert response.status_code == 403 and response["X-Error-Code"] == "missing_scope"
    # x-api-key works as well as Authorization.
    _, ingest_key = make_key(project, scopes=["ingest"])
    assert post(body, None, HTTP_X_API_KEY=ingest_key).status_code == 200
    # A person signed in to the admin is not an agent: 401.
    c = Client()
    c.force_login(alice)
    assert c.post("/v1/traces", data=body, content_type=PB).status_code == 401
    # A revoked key is refused.
    from apps.projects import services as project_services
    revoked, revoked_raw = make_key(project, scopes=["ingest"])
    project_services.api_key_revoke(key=revoked, actor=alice)
    assert post(body, revoked_raw).status_code == 401
    assert IngestBatch.objects.count() == 1


def test_wrong_content_type_or_encoding_is_415_and_get_is_405(key):
    _, req = one_trace()
    assert post(req.SerializeToString(), key, content_type="text/plain").status_code == 415
    assert post(req.SerializeToString(), key, HTTP_CONTENT_ENCODING="br").status_code == 415
    response = Client().get("/v1/traces", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 405 and response["Allow"] == "POST"


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(project, make_key):
    limited, raw = make_key(project, scopes=["ingest"])
    limited.rate_limit_per_minute = 2
    limited.save(update_fields=["rate_limit_per_minute"])
    _, req = one_trace()
    body = req.SerializeToString()
    codes = [post(body, raw).status_code for _ in range(3)]
    assert codes[:2] == [200, 200]
    if codes[2] == 200:  # the two first fell on either side of a minute boundary
        codes.append(post(body, raw).status_code)
    assert codes[-1] == 429
    response = post(body, raw)
    assert response.status_code == 429 and 1 <= int(response["Retry-After"]) <= 61
    assert status_of(response).code == 8  # RESOURCE_EXHAUSTED
    # Another key of the same project is not limited by this one.
    _, other = make_key(project, scopes=["ingest"])
    assert post(body, other).status_code == 200


def test_backlog_over_the_high_watermark_sheds_with_503_until_under_the_low(key, settings):
    settings.INGEST_BACKLOG_HIGH = 4
    settings.INGEST_BACKLOG_LOW = 2
    for _ in range(2):
        assert post(one_trace()[1].SerializeToString(), key).status_code == 200  # 4 spans waiting
    response = post(one_trace()[1].SerializeToString(), key)
    assert response.status_code == 503 and int(response["Retry-After"]) > 0
    assert status_of(response).code == 14  # UNAVAILABLE: exporters retry
    assert IngestBatch.objects.count() == 2  # the shed request stored nothing
    drain()
    assert post(one_trace()[1].SerializeToString(), key).status_code == 200


def test_logs_attach_to_their_span_as_events_and_fill_genai_messages(key, project):
    tid, req = one_trace()
    chat = req.resource_spans[0].scope_spans[0].spans[1]
    assert post(req.SerializeToString(), key).status_code == 200
    logs = b.logs_request(
        {"trace_id": tid, "span_id": chat.span_id, "event_name": "gen_ai.client.inference.operation.details",
         "attributes": {"gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]),
                        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "hello"}]}])}},
        {"trace_id": tid, "span_id": chat.span_id, "body": "cache miss", "severity": "INFO", "at_ms": 3},
        {"body": "a log outside any span"},
    )
    response = post(logs.SerializeToString(), key, path="/v1/logs")
    assert response.status_code == 200
    partial = ExportLogsServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_log_records == 1 and "inside a span" in partial.error_message
    drain()
    from rest_framework.test import APIClient

    from apps.projects import services as project_services
    _, read = project_services.api_key_create(project=project, name="r", scopes=["read"], actor=None)
    run = APIClient().get(f"/api/v1/runs/{tid.hex()}", HTTP_AUTHORIZATION=f"Bearer {read}").json()
    span = next(s for s in run["spans"] if s["span_id"] == chat.span_id.hex())
    names = [e["name"] for e in span["events"]]
    assert "gen_ai.client.inference.operation.details" in names and "log" in names
    log_event = next(e for e in span["events"] if e["name"] == "log")
    assert log_event["attributes"] == {"body": "cache miss", "severity": "INFO"}
    assert span["input_messages"][0]["parts"][0]["content"] == "hi"
    assert span["output_messages"][0]["parts"][0]["content"] == "hello"
