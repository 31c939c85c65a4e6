"""Stored OTLP batches → canonical run-log records (run by the projection, on a worker)."""
from __future__ import annotations

from apps.traces.models import IngestBatch
from apps.traces.records import RecordError

from . import otlp
from .normalise import trace_records


def _raw(batch: IngestBatch) -> bytes:
    if batch.raw is None:
        raise RecordError("raw", "the batch holds no payload")
    return bytes(batch.raw)


def decode_traces(batch: IngestBatch) -> list[dict]:
    try:
        request = otlp.parse_traces(_raw(batch), otlp.PROTOBUF)
    except otlp.OtlpDecodeError as exc:
        raise RecordError("raw", str(exc)) from None
    return trace_records(otlp.span_views(request))


def decode_logs(batch: IngestBatch) -> list[dict]:
    try:
        request = otlp.parse_logs(_raw(batch), otlp.PROTOBUF)
    except otlp.OtlpDecodeError as exc:
        raise RecordError("raw", str(exc)) from None
    return otlp.log_records(request)
