"""The canonical write records stored in the inbox, and their validation.

Every write path (the REST API here; OTLP in apps.ingest, whose normaliser emits the same records)
turns its input into a list of records, so the projection only ever reads one format:

* ``{"op": "run.start", "run_id", "agent_name", "agent_version", "input", "end_user", "session_id",
  "parent_run_id", "metadata", "status", "started_at"}``
* ``{"op": "span", "run_id", "span": {...}}`` (the span object of the REST API, normalised)
* ``{"op": "span.update", "run_id", "span_id", "fields": {...}, "at"}``
* ``{"op": "run.finish", "run_id", "status", "output", "error_code", "error_details",
  "failing_span_id", "ended_at"}``

Validation is hand-written rather than DRF serializers: it runs for every span of every batch, and
it must name the exact field at fault (``spans[3].usage.input_tokens``). It refuses whatever the
database could not store (see the limits below), so that nothing accepted fails to store;
``validate_record`` checks a canonical record from any producer against the same rules. Times are
stored as RFC 3339 strings in UTC. Pure Python: no database access.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from .models import SpanKind, SpanStatus

ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # used with fullmatch
TRACE_NAMESPACE = uuid.UUID("6f1c2b9e-2a57-4c55-9a43-3c3b0e7d1a10")
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
KINDS = frozenset(SpanKind.values)
SPAN_STATUSES = frozenset(SpanStatus.values)
RUN_START_STATUSES = ("pending", "running")
RUN_FINISH_STATUSES = ("completed", "failed", "cancelled")
MAX_SPANS_PER_REQUEST = 5000
# What the database can hold, checked at the door so that nothing accepted fails to store:
# token counts far past any model's context (and small enough that a run's sum stays inside bigint),
# PositiveIntegerField for counters, and a nesting depth that every walker of a record (redaction,
# the JSON encoder, PostgreSQL's jsonb) handles without recursing out of its stack.
MAX_TOKENS = 10**12
MAX_SMALL_COUNT = 2**31 - 1
MAX_DEPTH = 64
BIGINT_MAX = 2**63 - 1


class RecordError(ValueError):
    """Input that cannot be stored; ``field`` is the path to it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def trace_id_for_run(run_id: str) -> str:
    """The trace id of a run created over REST: derived from its run id, so spans that arrive
    before the run know it too."""
    return uuid.uuid5(TRACE_NAMESPACE, run_id).hex


def new_id() -> str:
    return uuid.uuid4().hex


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# --- primitive checks ---------------------------------------------------------------------------

def reject_constant(name: str):
    """``parse_constant`` for json: NaN and Infinity are not JSON numbers, and no JSON column holds them."""
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    """``parse_float`` for json: 1e400 parses as inf, which no JSON column can hold."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


# Built once (json.loads with hooks builds a decoder per call).
STRICT_JSON = json.JSONDecoder(parse_constant=reject_constant, parse_float=finite_float)


def _max_field_bytes() -> int:
    return getattr(settings, "TRACES_MAX_FIELD_BYTES", 1024 * 1024)


def _obj(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise RecordError(field, "must be an object.")
    return value


def text_problem(value: str) -> str | None:
    """Why the database cannot store this string (its text and JSON types refuse NUL, and UTF-8 has
    no encoding for half a surrogate pair), or None."""
    if "\x00" in value:
        return "must not contain the NUL character (\\u0000)."
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "must not contain unpaired UTF-16 surrogates (\\ud800-\\udfff)."
    return None


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in (item.values() if isinstance(item, dict) else item):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def json_problem(value: Any, *, limit: int | None = None) -> str | None:
    """Why free JSON (an input, attributes, messages) cannot be stored, or None: too large, nested
    deeper than MAX_DEPTH, a non-finite number, NUL or a lone surrogate in any key or string."""
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number (not NaN or Infinity)."
    limit = limit or _max_field_bytes()
    if isinstance(value, str):
        if len(value) > limit:  # characters: a lower bound of the bytes, and cheap
            return f"is larger than the {limit} byte limit for one field."
        problem = text_problem(value)
        if problem is None and not value.isascii() and len(value.encode()) > limit:
            return f"is larger than the {limit} byte limit for one field."
        return problem
    if not isinstance(value, (dict, list)):
        return "must be JSON (an object, list, string, number, boolean or null)."
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        return f"must be JSON nested at most {MAX_DEPTH} levels deep."
    except (TypeError, ValueError) as exc:
        if "float" in str(exc):
            return "must not hold non-finite numbers (NaN or Infinity)."
        return f"is not JSON the store can hold ({exc})."
    try:
        size = len(encoded.encode())
    except UnicodeEncodeError:
        return "must not contain unpaired UTF-16 surrogates (\\ud800-\\udfff)."
    if size > limit:
        return f"is larger than the {limit} byte limit for one field."
    # The encoder escapes NUL as \u0000; a match can also be a literal backslash-u0000 (rare): look.
    if "\\u0000" in encoded and _holds_nul(value):
        return "must not contain the NUL character (\\u0000)."
    if _too_deep(value, MAX_DEPTH):
        return f"must be JSON nested at most {MAX_DEPTH} levels deep."
    return None


def _holds_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _str(value: Any, field: str, *, max_len: int = 500, allow_empty: bool = True) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(field, "must be a string.")
    if len(value) > max_len:
        raise RecordError(field, f"must be at most {max_len} characters.")
    if not allow_empty and not value:
        raise RecordError(field, "must not be empty.")
    problem = text_problem(value)
    if problem:
        raise RecordError(field, problem)
    return value


def _id(value: Any, field: str, *, max_len: int = 128) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value) or len(value) > max_len:
        raise RecordError(field, f"must be 1-{max_len} characters of letters, digits, '.', '_', ':' or '-'.")
    return value


def _opt_id(value: Any, field: str, *, max_len: int = 64) -> str:
    if value in (None, ""):
        return ""
    return _id(value, field, max_len=max_len)


# Timestamps outside these years are refused: they are mistakes (a zero value, seconds taken for
# milliseconds), and at the edges of the calendar they overflow date arithmetic.
MIN_YEAR, MAX_YEAR = 1970, 2999


def _time(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(field, "must be an RFC 3339 timestamp string.")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise RecordError(field, "must be an RFC 3339 timestamp (e.g. 2026-01-02T03:04:05.678Z).") from None
    if parsed.tzinfo is None:
        raise RecordError(field, "must carry a time zone offset (e.g. Z or +02:00).")
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        parsed = None
    if parsed is None or not MIN_YEAR <= parsed.year <= MAX_YEAR:
        raise RecordError(field, f"must fall between the years {MIN_YEAR} and {MAX_YEAR}.")
    return parsed.isoformat()


def _count(value: Any, field: str, *, max_value: int = MAX_TOKENS) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(field, "must be an integer.")
    if value < 0:
        raise RecordError(field, "must not be negative.")
    if value > max_value:
        raise RecordError(field, f"must be at most {max_value}.")
    return value


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(field, "must be a number.")
    if value < 0 or not math.isfinite(value):
        raise RecordError(field, "must be a finite number, not negative.")
    return float(value)


def _blob(value: Any, field: str) -> Any:
    """Free JSON (inputs, outputs, messages): bounded in size and depth so one field cannot swamp
    the store, and nothing in it that the database refuses."""
    problem = json_problem(value)
    if problem:
        raise RecordError(field, problem)
    return value


def _map(value: Any, field: str) -> dict:
    if value is None:
        return {}
    _obj(value, field)
    return _blob(value, field)


# --- records -------------------------------------------------------------------------------------

def run_start_record(data: Any, *, received_at: str) -> dict:
    data = _obj(data, "body")
    agent = data.get("agent")
    if agent is None:
        agent = {}
    elif isinstance(agent, str):
        agent = {"name": agent}
    _obj(agent, "agent")
    status = data.get("status", "running")
    if status not in RUN_START_STATUSES:
        raise RecordError("status", f"must be one of {', '.join(RUN_START_STATUSES)}.")
    run_id = data.get("run_id")
    return {
        "op": "run.start",
        "run_id": _id(run_id, "run_id") if run_id not in (None, "") else new_id(),
        "agent_name": _str(agent.get("name"), "agent.name", max_len=200),
        "agent_version": _str(agent.get("version"), "agent.version", max_len=100),
        "input": _blob(data.get("input"), "input"),
        "end_user": _str(data.get("end_user"), "end_user", max_len=256),
        "session_id": _str(data.get("session_id"), "session_id", max_len=256),
        "parent_run_id": _opt_id(data.get("parent_run_id"), "parent_run_id", max_len=128),
        "metadata": _map(data.get("metadata"), "metadata"),
        "status": status,
        "started_at": _time(data["started_at"], "started_at") if data.get("started_at") else received_at,
    }


def run_finish_record(run_id: str, data: Any, *, received_at: str) -> dict:
    data = _obj(data, "body")
    status = data.get("status", "completed")
    if status not in RUN_FINISH_STATUSES:
        raise RecordError("status", f"must be one of {', '.join(RUN_FINISH_STATUSES)}.")
    error_details = data.get("error_details")
    if error_details is not None:
        _obj(error_details, "error_details")
    return {
        "op": "run.finish",
        "run_id": _id(run_id, "run_id"),
        "status": status,
        "output": _blob(data.get("output"), "output"),
        "error_code": _str(data.get("error_code"), "error_code", max_len=100),
        "error_details": _blob(error_details, "error_details"),
        "failing_span_id": _opt_id(data.get("failing_span_id"), "failing_span_id"),
        "ended_at": _time(data["ended_at"], "ended_at") if data.get("ended_at") else received_at,
    }


def _usage(value: Any, field: str) -> dict:
    usage = _obj(value, field)
    unknown = set(usage) - set(USAGE_KEYS) - {"total_tokens"}
    if unknown:
        raise RecordError(f"{field}.{sorted(unknown)[0]}", f"is not a usage field ({', '.join(USAGE_KEYS)}).")
    return {k: _count(usage.get(k), f"{field}.{k}") for k in USAGE_KEYS if usage.get(k) is not None}


def _tool(value: Any, field: str, *, partial: bool) -> dict:
    tool = _obj(value, field)
    out: dict[str, Any] = {}
    if "name" in tool or not partial:
        out["name"] = _str(tool.get("name"), f"{field}.name", max_len=200, allow_empty=False)
    if tool.get("call_id") is not None:
        out["call_id"] = _str(tool.get("call_id"), f"{field}.call_id", max_len=200)
    for key in ("arguments", "result"):
        if key in tool:
            out[key] = _blob(tool[key], f"{field}.{key}")
    if tool.get("error") is not None:
        out["error"] = _str(tool.get("error"), f"{field}.error", max_len=10_000)
    return out


def _events(value: Any, field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(field, "must be a list of {name, time, attributes}.")
    out = []
    for i, event in enumerate(value):
        event = _obj(event, f"{field}[{i}]")
        item = {"name": _str(event.get("name"), f"{field}[{i}].name", max_len=500, allow_empty=False)}
        if event.get("time") is not None:
            item["time"] = _time(event["time"], f"{field}[{i}].time")
        if event.get("attributes") is not None:
            item["attributes"] = _map(event["attributes"], f"{field}[{i}].attributes")
        out.append(item)
    _blob(out, field)
    return out


def _span_fields(data: dict, prefix: str, *, partial: bool) -> dict:
    """The span's fields other than its identity; ``partial`` for a late update (all optional)."""
    out: dict[str, Any] = {}
    p = prefix

    if "kind" in data and data["kind"] is not None:
        if data["kind"] not in KINDS:
            raise RecordError(f"{p}kind", f"unknown kind {str(data['kind'])[:50]!r}; one of {', '.join(SpanKind.values)}.")
        out["kind"] = data["kind"]
    if data.get("name") is not None:
        out["name"] = _str(data["name"], f"{p}name", max_len=500, allow_empty=False)
    for key in ("start_time", "end_time"):
        if data.get(key) is not None:
            out[key] = _time(data[key], f"{p}{key}")
    if data.get("status") is not None:
        if data["status"] not in SPAN_STATUSES:
            raise RecordError(f"{p}status", "must be one of ok, error, unset.")
        out["status"] = data["status"]
    for key, max_len in (("status_message", 10_000), ("error_code", 100), ("component", 200), ("action", 200),
                         ("provider", 100), ("model", 200), ("response_model", 200), ("endpoint", 500)):
        if data.get(key) is not None:
            out[key] = _str(data[key], f"{p}{key}", max_len=max_len)
    for key in ("retry_of", "fallback_of"):
        if data.get(key) not in (None, ""):
            out[key] = _id(data[key], f"{p}{key}", max_len=64)
    if data.get("details") is not None:
        out["details"] = _blob(data["details"], f"{p}details")
    for key in ("input_messages", "output_messages"):
        if data.get(key) is not None:
            out[key] = _blob(data[key], f"{p}{key}")
    if data.get("usage") is not None:
        out["usage"] = _usage(data["usage"], f"{p}usage")
    if data.get("time_to_first_token_ms") is not None:
        out["time_to_first_token_ms"] = _number(data["time_to_first_token_ms"], f"{p}time_to_first_token_ms")
    if data.get("stream") is not None:
        stream = _obj(data["stream"], f"{p}stream")
        out["stream"] = {k: v for k, v in {
            "chunks": _count(stream.get("chunks"), f"{p}stream.chunks", max_value=MAX_SMALL_COUNT),
            "output_tokens_per_second": _number(stream.get("output_tokens_per_second"),
                                                f"{p}stream.output_tokens_per_second"),
        }.items() if v is not None}
    if data.get("tool") is not None:
        out["tool"] = _tool(data["tool"], f"{p}tool", partial=partial)
    if data.get("attributes") is not None:
        out["attributes"] = _map(data["attributes"], f"{p}attributes")
    if data.get("events") is not None:
        out["events"] = _events(data["events"], f"{p}events")

    if "start_time" in out and "end_time" in out and out["end_time"] < out["start_time"]:
        raise RecordError(f"{p}end_time", "is before start_time.")
    return out


def span_record(run_id: str, data: Any, *, received_at: str, index: int | None = None) -> dict:
    prefix = f"spans[{index}]." if index is not None else ""
    data = _obj(data, prefix.rstrip(".") or "body")
    span = _span_fields(data, prefix, partial=False)
    span["span_id"] = _id(data["span_id"], f"{prefix}span_id", max_len=64) if data.get("span_id") else new_id()
    span["parent_span_id"] = _opt_id(data.get("parent_span_id"), f"{prefix}parent_span_id")
    span.setdefault("start_time", received_at)
    if "end_time" in span and span["end_time"] < span["start_time"]:
        raise RecordError(f"{prefix}end_time", "is before start_time.")
    if "kind" not in span:
        span["kind"] = ("tool" if "tool" in span else "llm" if ("usage" in span or "model" in span)
                        else "step" if "component" in span else "other")
    if "name" not in span:
        span["name"] = (span.get("tool", {}).get("name") or span.get("model") or span.get("action")
                        or span["kind"])
    return {"op": "span", "run_id": _id(run_id, "run_id"), "span": span}


def span_update_record(run_id: str, span_id: str, data: Any, *, received_at: str) -> dict:
    data = _obj(data, "body")
    if "span_id" in data and data["span_id"] != span_id:
        raise RecordError("span_id", "cannot be changed.")
    fields = _span_fields({k: v for k, v in data.items() if k not in ("span_id", "parent_span_id")}, "",
                          partial=True)
    if not fields:
        raise RecordError("body", "names no field to update.")
    return {"op": "span.update", "run_id": _id(run_id, "run_id"), "span_id": _id(span_id, "span_id", max_len=64),
            "fields": fields, "at": received_at}


def spans_records(run_id: str, data: Any, *, received_at: str) -> list[dict]:
    """One span object or a list of them (``{"spans": [...]}`` is accepted too)."""
    if isinstance(data, dict) and "spans" in data:
        if not isinstance(data["spans"], list):
            raise RecordError("spans", "must be a list of span objects.")
        data = data["spans"]
    if isinstance(data, list):
        if not data:
            raise RecordError("spans", "must not be empty.")
        if len(data) > MAX_SPANS_PER_REQUEST:
            raise RecordError("spans", f"at most {MAX_SPANS_PER_REQUEST} spans per request.")
        records = [span_record(run_id, item, received_at=received_at, index=i) for i, item in enumerate(data)]
        seen: set[str] = set()
        for i, record in enumerate(records):
            sid = record["span"]["span_id"]
            if sid in seen:
                raise RecordError(f"spans[{i}].span_id", "appears twice in this request.")
            seen.add(sid)
        return records
    return [span_record(run_id, data, received_at=received_at)]


# --- the canonical record, as every producer emits it ---------------------------------------------

OPS = ("run.start", "span", "span.update", "run.finish")


def validate_record(rec: Any, field: str = "record") -> None:
    """Check one canonical record (as the REST builders above or the OTLP normaliser emit it) against
    what the store can hold. Raises RecordError naming the field. The projection uses it to say why a
    record it could not store was refused; tests feed it every producer's output."""
    rec = _obj(rec, field)
    op = rec.get("op")
    if op not in OPS:
        raise RecordError(f"{field}.op", f"must be one of {', '.join(OPS)}.")
    _id(rec.get("run_id"), f"{field}.run_id")
    if rec.get("trace_id") is not None:
        _id(rec["trace_id"], f"{field}.trace_id", max_len=32)
    if op == "run.start":
        for key, max_len in (("agent_name", 200), ("agent_version", 100), ("end_user", 256), ("session_id", 256)):
            _str(rec.get(key), f"{field}.{key}", max_len=max_len)
        _opt_id(rec.get("parent_run_id"), f"{field}.parent_run_id", max_len=128)
        _blob(rec.get("input"), f"{field}.input")
        _map(rec.get("metadata"), f"{field}.metadata")
        if not rec.get("fill"):
            if rec.get("status", "running") not in RUN_START_STATUSES:
                raise RecordError(f"{field}.status", f"must be one of {', '.join(RUN_START_STATUSES)}.")
            _time(rec.get("started_at"), f"{field}.started_at")
    elif op == "span":
        span = _obj(rec.get("span"), f"{field}.span")
        prefix = f"{field}.span."
        _id(span.get("span_id"), f"{prefix}span_id", max_len=64)
        _opt_id(span.get("parent_span_id"), f"{prefix}parent_span_id")
        for key in ("name", "kind", "start_time"):
            if span.get(key) is None:
                raise RecordError(f"{prefix}{key}", "is required.")
        _span_fields(span, prefix, partial=False)
    elif op == "span.update":
        _id(rec.get("span_id"), f"{field}.span_id", max_len=64)
        _span_fields(_obj(rec.get("fields"), f"{field}.fields"), f"{field}.fields.", partial=True)
        if rec.get("at") is not None:
            _time(rec["at"], f"{field}.at")
    else:
        if rec.get("status") not in RUN_FINISH_STATUSES:
            raise RecordError(f"{field}.status", f"must be one of {', '.join(RUN_FINISH_STATUSES)}.")
        _blob(rec.get("output"), f"{field}.output")
        _blob(rec.get("error_details"), f"{field}.error_details")
        _str(rec.get("error_code"), f"{field}.error_code", max_len=100)
        _opt_id(rec.get("failing_span_id"), f"{field}.failing_span_id")
        _time(rec.get("ended_at"), f"{field}.ended_at")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
