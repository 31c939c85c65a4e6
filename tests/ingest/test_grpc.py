"""OTLP/gRPC on its own port: the real SDK's gRPC exporters, and every status code the spec names.

The server is the one ``manage.py otlp_grpc`` runs (``build_server``), on a free port in this process;
the command itself runs as a process in the database-outage test (tests/traces/test_db_unavailable.py).
"""
from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

from apps.ingest.grpc_server import build_server
from apps.traces.models import IngestBatch, Run, Span
from tests.traces.helpers import drain

from . import builders as b
from .otel import flush, sdk
from .test_sdk_genai import _agent_trace

pytestmark = pytest.mark.django_db(transaction=True)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture
def grpc_port():
    server, port = build_server(port=0, workers=4)
    server.start()
    yield port
    server.stop(grace=1).wait()


def _export(port: int, body: bytes, metadata=()):
    """One raw Export call: (status code, response or None, google.rpc.Status details or None)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(EXPORT, request_serializer=None,
                                   response_deserializer=ExportTraceServiceResponse.FromString)
        try:
            response = call(body, metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, response, None
        except grpc.RpcError as exc:
            details = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
            return exc.code(), None, status_pb2.Status.FromString(details) if details else None


def _retry_delay(status: status_pb2.Status) -> int:
    info = error_details_pb2.RetryInfo()
    assert status.details and status.details[0].Unpack(info)
    return info.retry_delay.seconds


def test_the_sdk_grpc_exporters_deliver_a_genai_trace_and_its_logs(grpc_port, project, make_key, api_client):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_raw = make_key(project, scopes=["read"])
    headers = {"authorization": f"Bearer {raw}"}
    provider, tracer, exporter = sdk("", raw, service="grpc-agent", exporter_cls=_GrpcExporter, endpoint_path="",
                                     grpc_port=grpc_port)
    log_provider = LoggerProvider()
    log_provider.add_log_record_processor(SimpleLogRecordProcessor(
        OTLPLogExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, headers=headers, timeout=10)))
    logger = logging.getLogger("tests.grpc.agent")
    logger.propagate = False
    handler = LoggingHandler(logger_provider=log_provider)
    logger.addHandler(handler)
    try:
        with tracer.start_as_current_span("note") as note_span:
            logger.warning("cache miss for order A-17")
            note_trace = note_span.get_span_context().trace_id
        trace_id, ids = _agent_trace(tracer, retry=True)
    finally:
        logger.removeHandler(handler)
        log_provider.shutdown()
    flush(provider, exporter)
    drain()

    run = api_client.get(f"/api/v1/runs/{trace_id:032x}", HTTP_AUTHORIZATION=f"Bearer {read_raw}").json()
    assert run["agent"] == {"name": "support-bot", "version": "2.1"} and run["end_user"] == "user-42"
    assert run["status"] == "completed" and run["span_count"] == 5
    assert run["usage"]["input_tokens"] == 250 and run["usage"]["output_tokens"] == 60
    assert sorted((c["name"], c["status"]) for c in run["tool_calls"]) == [("lookup_order", "error"),
                                                                         ("lookup_order", "ok")]
    assert run["metadata"]["resource"]["service.name"] == "grpc-agent"
    note = api_client.get(f"/api/v1/runs/{note_trace:032x}", HTTP_AUTHORIZATION=f"Bearer {read_raw}").json()
    events = note["spans"][0]["events"]
    assert [e["attributes"]["body"] for e in events if e["name"] == "log"] == ["cache miss for order A-17"]
    assert set(IngestBatch.objects.values_list("source", flat=True)) == {"otlp-grpc"}


class _GrpcExporter(OTLPSpanExporter):
    """The SDK's own OTLP/gRPC exporter, remembering what each export returned (as RecordingExporter)."""

    def __init__(self, *, endpoint: str, headers: dict, timeout: int, grpc_port: int):
        super().__init__(endpoint=f"127.0.0.1:{grpc_port}", insecure=True,
                         headers={k.lower(): v for k, v in headers.items()}, timeout=timeout)
        self.results, self.exported = [], 0

    def export(self, spans):
        result = super().export(spans)
        self.results.append(result)
        self.exported += len(spans)
        return result


def test_status_codes(grpc_port, project, make_key, settings):
    _, raw = make_key(project, scopes=["ingest"])
    _, read_only = make_key(project, scopes=["read"])
    tid = b.trace_id()
    good = b.request(b.span(tid, name="root")).SerializeToString()
    auth = (("authorization", f"Bearer {raw}"),)

    assert _export(grpc_port, good)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _export(grpc_port, good, (("authorization", "Bearer cp_live_nope"),))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _export(grpc_port, good, (("x-api-key", read_only),))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _export(grpc_port, b"\xff\xff\xff", auth)[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, response, _ = _export(grpc_port, b"", auth)
    assert code == grpc.StatusCode.OK and not response.HasField("partial_success")
    assert IngestBatch.objects.count() == 0

    # Partial success: the bad span is named, the good one kept; x-api-key works as well.
    bad = b.span(tid, name="")
    code, response, _ = _export(grpc_port, b.request(b.span(tid, name="kept"), bad).SerializeToString(),
                                (("x-api-key", raw),))
    assert code == grpc.StatusCode.OK and response.partial_success.rejected_spans == 1
    assert "name" in response.partial_success.error_message

    # The same request three times counts once.
    for _ in range(3):
        assert _export(grpc_port, good, auth)[0] == grpc.StatusCode.OK
    drain()
    assert Span.objects.filter(name="root").count() == 1 and Run.objects.get(trace_id=tid.hex()).span_count == 2

    # Backlog over the high watermark: UNAVAILABLE with RetryInfo (exporters retry), nothing stored.
    settings.INGEST_BACKLOG_HIGH, settings.INGEST_BACKLOG_LOW = 1, 1
    assert _export(grpc_port, b.request(b.span(b.trace_id(), name="waits")).SerializeToString(), auth)[0] \
        == grpc.StatusCode.OK
    before = IngestBatch.objects.count()
    code, _, status = _export(grpc_port, good, auth)
    assert code == grpc.StatusCode.UNAVAILABLE and _retry_delay(status) > 0
    assert IngestBatch.objects.count() == before
    settings.INGEST_BACKLOG_HIGH = 0

    # A key over its rate: RESOURCE_EXHAUSTED with RetryInfo.
    limited, limited_raw = make_key(project, scopes=["ingest"])
    limited.rate_limit_per_minute = 1
    limited.save(update_fields=["rate_limit_per_minute"])
    codes = [_export(grpc_port, good, (("authorization", f"Bearer {limited_raw}"),)) for _ in range(3)]
    code, _, status = codes[-1]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and 1 <= _retry_delay(status) <= 61


def test_logs_service_refuses_an_outsider(grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                                   request_serializer=None,
                                   response_deserializer=ExportLogsServiceResponse.FromString)
        with pytest.raises(grpc.RpcError) as exc:
            call(b"", metadata=(("authorization", "Bearer not-a-key"),), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
