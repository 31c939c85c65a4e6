"""OTLP wire formats: protobuf and OTLP/JSON requests in, span views and log records out.

Pure Python over ``opentelemetry-proto`` (no Django). The same validation runs when a request is
accepted (to answer ``partial_success``) and when its stored batch is projected (to skip what was
rejected), so the two always agree.
"""
from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Iterator
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from apps.traces.records import MAX_CHARS

from .normalise import iso, json_or_text

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_SPAN_BYTES = 8 * 1024 * 1024  # one span, all attributes and events included


class OtlpDecodeError(ValueError):
    """The body is not a well-formed OTLP request (answered 400 with a google.rpc.Status)."""


# --- values ------------------------------------------------------------------------------------------


REPLACEMENT = "\ufffd"
# The attribute that marks a stored span or log event whose strings had NUL replaced (how many).
REPLACED_ATTRIBUTE = "controlplane.nul_replaced"
_replaced = threading.local()


def clean(text: str) -> str:
    """A string the store can hold: NUL (valid UTF-8, refused by the database's text and JSON types)
    becomes U+FFFD, visibly, and is counted (``replacements``). Protobuf refuses other invalid UTF-8."""
    if "\x00" not in text:
        return text
    _replaced.count = getattr(_replaced, "count", 0) + 1
    return text.replace("\x00", REPLACEMENT)


def replacements() -> int:
    """How many strings ``clean`` changed since the last call (this thread), and start again."""
    count = getattr(_replaced, "count", 0)
    _replaced.count = 0
    return count


def any_value(v) -> Any:
    which = v.WhichOneof("value")
    if which == "string_value":
        return clean(v.string_value)
    if which == "int_value":
        return v.int_value
    if which == "bool_value":
        return v.bool_value
    if which == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {clean(kv.key): any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return None


def attributes(kvs) -> dict:
    return {clean(kv.key): any_value(kv.value) for kv in kvs}


# --- parsing -----------------------------------------------------------------------------------------

_HEX_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_to_b64(obj: dict) -> None:
    for key in _HEX_FIELDS:
        value = obj.get(key)
        if isinstance(value, str):
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                obj[key] = ""  # not hex: the span is rejected for its id, not the whole request


def _children(obj: Any, *keys: str) -> Iterator[dict]:
    """Dicts under obj[k1][*][k2][*]..., accepting lowerCamelCase or snake_case names."""
    nodes = [obj]
    for key in keys:
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        nxt = []
        for node in nodes:
            if not isinstance(node, dict):
                continue
            items = node.get(key, node.get(snake))
            if isinstance(items, list):
                nxt.extend(i for i in items if isinstance(i, dict))
        nodes = nxt
    return iter(nodes)


def _parse(body: bytes, content_type: str, message: Message, *, json_paths: tuple[tuple[str, ...], ...]) -> Message:
    if content_type == PROTOBUF:
        try:
            message.ParseFromString(body)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OtlpDecodeError(f"The body is not a valid protobuf {message.DESCRIPTOR.name}: {exc}") from None
        return message
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise OtlpDecodeError(f"The body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OtlpDecodeError(f"The body must be a JSON object ({message.DESCRIPTOR.name}).")
    for path in json_paths:
        for obj in _children(data, *path):
            _hex_to_b64(obj)
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise OtlpDecodeError(f"The body is not a valid OTLP/JSON {message.DESCRIPTOR.name}: {exc}") from None
    return message


def parse_traces(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    return _parse(body, content_type, ExportTraceServiceRequest(), json_paths=(
        ("resourceSpans", "scopeSpans", "spans"), ("resourceSpans", "scopeSpans", "spans", "links")))


def parse_logs(body: bytes, content_type: str) -> ExportLogsServiceRequest:
    return _parse(body, content_type, ExportLogsServiceRequest(),
                  json_paths=(("resourceLogs", "scopeLogs", "logRecords"),))


def encode(message: Message, content_type: str) -> bytes:
    if content_type == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def traces_response(rejected: int = 0, error_message: str = "") -> ExportTraceServiceResponse:
    response = ExportTraceServiceResponse()
    if rejected or error_message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = error_message
    return response


def logs_response(rejected: int = 0, error_message: str = "") -> ExportLogsServiceResponse:
    response = ExportLogsServiceResponse()
    if rejected or error_message:
        response.partial_success.rejected_log_records = rejected
        response.partial_success.error_message = error_message
    return response


# --- validation --------------------------------------------------------------------------------------

_ZERO16, _ZERO8 = bytes(16), bytes(8)


def span_problem(span) -> str | None:
    """Why a span cannot be stored, in English, or None."""
    if len(span.trace_id) != 16 or span.trace_id == _ZERO16:
        return f"trace_id must be 16 bytes, not all zero (got {len(span.trace_id)} bytes)"
    if len(span.span_id) != 8 or span.span_id == _ZERO8:
        return f"span_id must be 8 bytes, not all zero (got {len(span.span_id)} bytes)"
    if span.parent_span_id and len(span.parent_span_id) != 8:
        return f"parent_span_id must be empty or 8 bytes (got {len(span.parent_span_id)} bytes)"
    if not span.name:
        return "name is missing"
    if "\x00" in span.name:
        return "name contains the NUL character (\\u0000)"
    if not span.start_time_unix_nano:
        return "start_time_unix_nano is missing"
    if span.end_time_unix_nano and span.end_time_unix_nano < span.start_time_unix_nano:
        return "end_time_unix_nano is before start_time_unix_nano"
    if span.ByteSize() > MAX_SPAN_BYTES:
        return f"the span is larger than {MAX_SPAN_BYTES} bytes"
    return None


def log_problem(record) -> str | None:
    if len(record.trace_id) != 16 or len(record.span_id) != 8 or record.trace_id == _ZERO16:
        return "log records are kept only inside a span: trace_id (16 bytes) and span_id (8 bytes) are required"
    if record.ByteSize() > MAX_SPAN_BYTES:
        return f"the log record is larger than {MAX_SPAN_BYTES} bytes"
    return None


def _count(items, problem_of, describe) -> tuple[int, int, str]:
    """(items accepted, items rejected, the first rejection's message)."""
    accepted = rejected = 0
    first = ""
    for i, item in enumerate(items):
        problem = problem_of(item)
        if problem is None:
            accepted += 1
        else:
            rejected += 1
            first = first or f"{describe(i, item)}: {problem}"
    return accepted, rejected, first


def count_traces(request: ExportTraceServiceRequest) -> tuple[int, int, str]:
    spans = (span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans)
    return _count(spans, span_problem, lambda i, s: f"span {s.span_id.hex() or i!s} ({s.name[:100]!r})")


def count_logs(request: ExportLogsServiceRequest) -> tuple[int, int, str]:
    records = (r for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records)
    return _count(records, log_problem, lambda i, r: f"log record {i}")


# --- views for the normaliser -----------------------------------------------------------------------


def span_views(request: ExportTraceServiceRequest) -> list[dict]:
    """What the normaliser reads of each valid span. A span with NUL in a string other than its name
    (attributes, events, status message, links, its resource or scope) is kept with U+FFFD in its
    place and carries ``controlplane.nul_replaced``: the count, so the change is visible on the span.
    (Saying so in ``partial_success`` would mean reading every string of every span while the client
    waits, which took the accept's p99 past its target: see bench/RESULTS.md.)"""
    views = []
    for rs in request.resource_spans:
        replacements()
        resource = attributes(rs.resource.attributes)
        in_resource = replacements()
        for ss in rs.scope_spans:
            scope = clean(ss.scope.name)
            outer = in_resource + replacements()
            for span in ss.spans:
                if span_problem(span) is not None:
                    continue
                view = {
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(), "name": span.name, "kind": span.kind,
                    "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                    "status_code": span.status.code, "status_message": clean(span.status.message),
                    "attributes": attributes(span.attributes), "resource": resource, "scope": scope,
                    "size": span.ByteSize(),
                }
                if span.events:
                    view["events"] = [{"name": clean(e.name), "time_ns": e.time_unix_nano,
                                       "attributes": attributes(e.attributes)} for e in span.events]
                if span.links:
                    view["links"] = [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                                      **({"attributes": attributes(link.attributes)} if link.attributes else {})}
                                     for link in span.links]
                replaced = outer + replacements()
                if replaced:
                    view["attributes"][REPLACED_ATTRIBUTE] = replaced
                views.append(view)
    return views


GENAI_DETAILS_EVENT = "gen_ai.client.inference.operation.details"


def log_records(request: ExportLogsServiceRequest) -> list[dict]:
    """Canonical ``span.update`` records: each log record becomes an event on its span; the GenAI
    inference-details event also fills the span's input and output messages."""
    records = []
    for rl in request.resource_logs:
        for sl in rl.scope_logs:
            for record in sl.log_records:
                if log_problem(record) is not None:
                    continue
                replacements()
                attrs = attributes(record.attributes)
                name = clean(record.event_name) or attrs.pop("event.name", None) or "log"
                event_attrs = dict(attrs)
                if record.HasField("body"):
                    event_attrs["body"] = any_value(record.body)
                if record.severity_text:
                    event_attrs["severity"] = clean(record.severity_text)
                replaced = replacements()
                if replaced:
                    event_attrs[REPLACED_ATTRIBUTE] = replaced
                elif record.severity_number:
                    event_attrs["severity_number"] = record.severity_number
                when = record.time_unix_nano or record.observed_time_unix_nano
                event = {"name": str(name)[:MAX_CHARS["event.name"]], **({"time": iso(when)} if when else {}),
                         "attributes": event_attrs}
                fields: dict[str, Any] = {"events": [event]}
                if name == GENAI_DETAILS_EVENT:
                    body = event_attrs.get("body") if isinstance(event_attrs.get("body"), dict) else {}
                    for key, target in (("gen_ai.input.messages", "input_messages"),
                                        ("gen_ai.output.messages", "output_messages")):
                        value = attrs.get(key, body.get(key))
                        if value is not None:
                            fields[target] = json_or_text(value)
                trace_id = record.trace_id.hex()
                records.append({"op": "span.update", "run_id": trace_id, "trace_id": trace_id,
                                "span_id": record.span_id.hex(), "fields": fields})
    return records


def status_body(code: int, message: str, content_type: str) -> bytes:
    """A google.rpc.Status (the OTLP error body) in the request's encoding."""
    from google.rpc import status_pb2

    status = status_pb2.Status(code=code, message=message)
    return encode(status, content_type)
