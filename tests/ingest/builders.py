"""OTLP requests built by hand (protobuf messages), for the receiver's edge cases."""
from __future__ import annotations

import itertools

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

T0 = 1_795_000_000_000_000_000  # 2026-11-18, in nanoseconds
_ids = itertools.count(1)


def any_value(v) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[any_value(x) for x in v]))
    if isinstance(v, dict):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=any_value(x)) for k, x in v.items()]))
    return AnyValue(string_value=str(v))


def attrs(d: dict) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in d.items()]


def trace_id(n: int | None = None) -> bytes:
    return (n or next(_ids) + 10_000).to_bytes(16, "big")


def span_id(n: int | None = None) -> bytes:
    return (n or next(_ids) + 10_000).to_bytes(8, "big")


def span(tid: bytes, sid: bytes | None = None, *, parent: bytes = b"", name: str = "op", start: int = 0,
         duration_ms: int = 10, status: int = 1, message: str = "", attributes: dict | None = None,
         events: list[tuple[str, int, dict]] = ()) -> Span:
    s = Span(trace_id=tid, span_id=sid or span_id(), parent_span_id=parent, name=name,
             start_time_unix_nano=T0 + start * 1_000_000,
             end_time_unix_nano=T0 + (start + duration_ms) * 1_000_000,
             status=Status(code=status, message=message), kind=Span.SPAN_KIND_INTERNAL)
    s.attributes.extend(attrs(attributes or {}))
    for ev_name, at_ms, ev_attrs in events:
        ev = s.events.add(name=ev_name, time_unix_nano=T0 + at_ms * 1_000_000)
        ev.attributes.extend(attrs(ev_attrs))
    return s


def request(*spans: Span, resource: dict | None = None) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(attrs(resource or {"service.name": "builder"}))
    ss = rs.scope_spans.add()
    ss.scope.name = "tests"
    ss.spans.extend(spans)
    return req


def logs_request(*records: dict) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    for r in records:
        rec = sl.log_records.add(time_unix_nano=T0 + r.get("at_ms", 0) * 1_000_000,
                                 trace_id=r.get("trace_id", b""), span_id=r.get("span_id", b""),
                                 event_name=r.get("event_name", ""), severity_text=r.get("severity", ""))
        if "body" in r:
            rec.body.CopyFrom(any_value(r["body"]))
        rec.attributes.extend(attrs(r.get("attributes", {})))
    return req
