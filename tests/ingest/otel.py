"""The real OpenTelemetry Python SDK, configured the way an agent would point it at us."""
from __future__ import annotations

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult


class RecordingExporter(OTLPSpanExporter):
    """The SDK's own OTLP/HTTP exporter; it only remembers what each export returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results: list[SpanExportResult] = []
        self.exported = 0

    def export(self, spans):
        result = super().export(spans)
        self.results.append(result)
        self.exported += len(spans)
        return result


def sdk(base_url: str, raw_key: str, *, service: str = "agent-service", exporter_cls=RecordingExporter,
        endpoint_path: str = "/v1/traces", **exporter_kw):
    """(provider, tracer, exporter) sending to ``base_url`` with the key in an Authorization header."""
    exporter = exporter_cls(endpoint=f"{base_url}{endpoint_path}", headers={"Authorization": f"Bearer {raw_key}"},
                            timeout=10, **exporter_kw)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=512, schedule_delay_millis=60_000))
    return provider, provider.get_tracer("tests.ingest"), exporter


def flush(provider, exporter) -> None:
    assert provider.force_flush(10_000)
    provider.shutdown()
    assert exporter.results and all(r is SpanExportResult.SUCCESS for r in exporter.results), exporter.results
