"""Stored OTLP batches → canonical run-log records (run by the projection, on a worker).

Registered with the run log in ``IngestConfig.ready``; each is given the batch's stored payload and
raw bytes (the protobuf request), never the inbox row."""
from __future__ import annotations

from apps.traces.records import RecordError

from . import otlp
from .normalise import trace_records


def _raw(raw: bytes | None) -> bytes:
    if raw is None:
        raise RecordError("raw", "the batch holds no payload")
    return raw


def decode_traces(payload, raw: bytes | None) -> list[dict]:
    try:
        request = otlp.parse_traces(_raw(raw), otlp.PROTOBUF)
    except otlp.OtlpDecodeError as exc:
        raise RecordError("raw", str(exc)) from None
    return trace_records(otlp.span_views(request))


def decode_logs(payload, raw: bytes | None) -> list[dict]:
    try:
        request = otlp.parse_logs(_raw(raw), otlp.PROTOBUF)
    except otlp.OtlpDecodeError as exc:
        raise RecordError("raw", str(exc)) from None
    return otlp.log_records(request)
