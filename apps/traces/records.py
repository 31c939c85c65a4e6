"""The canonical records: the one format every producer writes into the inbox, and its validation.

Every write path turns its input into a list of records, so the projection only ever reads one
format: the REST API through the builders below (``run_start_record``, ``spans_records``,
``span_update_record``, ``run_finish_record``), OTLP through ``apps.ingest.normalise.trace_records``
and ``apps.ingest.otlp.log_records``, and any later producer (a model gateway, a GPU queue) the same
way. The format is the TypedDicts below (``Record`` is their union); each field's meaning, type and
limit is written there once, and the limits are the constants of the next section, read by the
builders, the normaliser and the API schema alike.

Validation is hand-written rather than DRF serializers: it runs for every span of every batch, and
it must name the exact field at fault (``spans[3].usage.input_tokens``). It refuses whatever the
database could not store, so that nothing accepted fails to store; ``validate_record`` checks a
canonical record from any producer against the same rules and against the TypedDicts' keys (tests
feed it every producer's output). ``redact`` applies a project's redaction to the free text of a
record. Times are RFC 3339 strings in UTC. Pure Python: no database access.
"""
import json
import math
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Required, TypedDict

from django.conf import settings

from apps.common.redaction import Redactor

from . import models
from .models import TOKEN_FIELDS, SpanKind, SpanStatus

# (No ``from __future__ import annotations`` here: Python 3.11 reads ``Required[...]`` in a TypedDict
# only from real annotations, and the contract test reads ``__required_keys__``.)

# --- limits: the one definition of each ------------------------------------------------------------


def _column(model, name: str) -> int:
    return model._meta.get_field(name).max_length


# The longest text of each record field, in characters. A field stored in a column takes the
# column's length, so a migration that changes one changes what the door accepts; the others bound
# what a free-text field may cost. ``span_id``'s limit holds for every span id (parent_span_id,
# retry_of, fallback_of, failing_span_id: columns of the same length).
MAX_CHARS: dict[str, int] = {
    "run_id": _column(models.Run, "run_id"),
    "parent_run_id": _column(models.Run, "parent_run_ref"),
    "trace_id": _column(models.Run, "trace_id"),
    "span_id": _column(models.Span, "span_id"),
    "agent_name": _column(models.Run, "agent_name"),
    "agent_version": _column(models.Run, "agent_version"),
    "end_user": _column(models.Run, "end_user"),
    "session_id": _column(models.Run, "session_id"),
    "error_code": _column(models.Span, "error_code"),  # a span's and a run's (same length)
    "name": _column(models.Span, "name"),
    "status_message": 10_000,
    "component": _column(models.Span, "component"),
    "action": _column(models.Span, "action"),
    "provider": _column(models.Span, "provider"),
    "model": _column(models.Span, "request_model"),
    "response_model": _column(models.Span, "response_model"),
    "endpoint": _column(models.Span, "endpoint"),
    "tool.name": _column(models.ToolCall, "name"),
    "tool.call_id": _column(models.ToolCall, "call_id"),
    "tool.error": 10_000,
    "event.name": 500,
}
# Ids (run, span, trace) are 1..MAX_CHARS[...] of these characters; used with fullmatch.
ID_RE = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_CHARS['run_id']}}}")
TRACE_NAMESPACE = uuid.UUID("6f1c2b9e-2a57-4c55-9a43-3c3b0e7d1a10")
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
# One free-JSON field (an input, a message list, an attribute map), encoded. The setting
# TRACES_MAX_FIELD_BYTES overrides it at the REST door; the OTLP normaliser cuts at this default.
MAX_FIELD_BYTES = 1024 * 1024
# Timestamps outside these years are refused: they are mistakes (a zero value, seconds taken for
# milliseconds), and at the edges of the calendar they overflow date arithmetic.
MIN_YEAR, MAX_YEAR = 1970, 2999


# --- the record contract -----------------------------------------------------------------------------
# Every record has ``op`` and ``run_id`` (an id: the agent's own over REST, the trace id over OTLP);
# ``trace_id`` (32 hex) is set by producers that know it (OTLP), else derived (``trace_id_for_run``).
# "JSON" below is free JSON: at most MAX_FIELD_BYTES encoded, MAX_DEPTH deep, with no NUL, lone
# surrogate or non-finite number anywhere. Text is at most MAX_CHARS[field] characters, without NUL
# or lone surrogates. Times are RFC 3339 with an offset, years MIN_YEAR..MAX_YEAR. Absent = not told.


class Usage(TypedDict, total=False):
    """Token counts of one model call, each an integer 0..MAX_TOKENS. Its keys are the run's total
    columns, ``models.TOKEN_FIELDS`` (REST also accepts ``total_tokens`` and drops it)."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int


class Stream(TypedDict, total=False):
    """How a streamed answer arrived."""

    chunks: int  # 0..MAX_SMALL_COUNT
    output_tokens_per_second: float  # finite, not negative


class Tool(TypedDict, total=False):
    """The tool a span called; with a name, it becomes a ToolCall row. An update may send only what
    changed."""

    name: str  # non-empty when sent (a span record's tool without one is stored as "")
    call_id: str  # the model's id for the call
    arguments: Any  # JSON
    result: Any  # JSON
    error: str  # why the call failed (text)


class Event(TypedDict, total=False):
    """Something that happened during a span (an OTLP span event or log record, a note)."""

    name: Required[str]  # non-empty
    time: str
    attributes: dict[str, Any]  # JSON object, kept verbatim


MAX_COST_USD = 10**6  # one span's reported cost
_NANO = Decimal("1e-9")


def format_cost(value: Decimal) -> str:
    """A cost in the canonical record: a decimal string in USD with nine places (nano-USD)."""
    return str(value.quantize(_NANO))


class _SpanBody(TypedDict, total=False):
    """The span object's fields other than its identity, in a span record and in an update:

    * ``name`` (non-empty text), ``kind`` (``models.SpanKind``), ``start_time``, ``end_time`` (not
      before start; absent: the span is open), ``status`` (``models.SpanStatus``) and
      ``status_message`` (text);
    * ``error_code`` (text: the producer's error type); ``retry_of`` / ``fallback_of``: the span id
      of the failed attempt this one retries or replaces;
    * ``component`` / ``action`` (text: where in the agent, what it did); ``details`` (JSON: the loop
      convention's values under ``loop``, ``graph_node``, ``evaluations``, ``links``);
    * a model call: ``provider``, ``model`` (requested), ``response_model``, ``endpoint`` (text),
      ``usage``, ``time_to_first_token_ms`` (finite, not negative), ``stream``,
      ``input_messages`` / ``output_messages`` (JSON); ``cost_usd``: what the producer says the call
      cost (a decimal string, USD, nine places; REST and OTLP accept a number too);
    * ``tool``; ``attributes`` (JSON object: what no field above took, verbatim); ``events``.
    """

    end_time: str
    status: Literal["ok", "error", "unset"]
    status_message: str
    error_code: str
    retry_of: str
    fallback_of: str
    component: str
    action: str
    details: Any
    provider: str
    model: str
    response_model: str
    endpoint: str
    usage: Usage
    cost_usd: str
    time_to_first_token_ms: float
    stream: Stream
    input_messages: Any
    output_messages: Any
    tool: Tool
    attributes: dict[str, Any]
    events: list[Event]


class SpanFields(_SpanBody, total=False):
    """What a ``span.update`` changes: any field of the span but its ids."""

    name: str
    kind: str
    start_time: str


class Span(_SpanBody, total=False):
    """The span object of a ``span`` record (see ``_SpanBody`` for the fields)."""

    span_id: Required[str]  # an id of at most MAX_CHARS["span_id"]
    parent_span_id: str  # "" or absent: a root span
    name: Required[str]
    kind: Required[str]  # one of models.SpanKind; REST infers it when not sent
    start_time: Required[str]  # REST: the time received when not sent


class RunStart(TypedDict, total=False):
    """A run starts (or, with ``fill``, is told about). A later ``run.start`` for the same run wins
    over what its spans told, but never reopens a finished run."""

    op: Required[Literal["run.start"]]
    run_id: Required[str]
    trace_id: str
    # OTLP, from a span other than the root: the run fields it tells fill blanks only (a sub-agent
    # never renames its run); such a record carries only the fields it tells, no status or time.
    fill: bool
    agent_name: str
    agent_version: str
    end_user: str  # who asked for the run: the attribution the sender chose (never redacted)
    session_id: str  # never redacted either
    parent_run_id: str  # "" or the id of the run that started this one (a sub-agent)
    input: Any  # JSON
    metadata: dict[str, Any]  # JSON object, merged into the run's
    status: Literal["pending", "running"]
    started_at: str


class SpanRecord(TypedDict, total=False):
    """A span, stored once: a later ``span`` with the same span id is a duplicate and ignored."""

    op: Required[Literal["span"]]
    run_id: Required[str]
    trace_id: str
    span: Required[Span]


class SpanUpdate(TypedDict, total=False):
    """A late change to a span (closing it, a result that came later): merged on read, in arrival
    order; maps (attributes, usage, tool, stream) merge, events append, the rest replaces."""

    op: Required[Literal["span.update"]]
    run_id: Required[str]
    trace_id: str
    span_id: Required[str]
    fields: Required[SpanFields]  # at least one field
    at: str  # when it was received (REST): noted as an event on the span


class RunFinish(TypedDict, total=False):
    """A run ends."""

    op: Required[Literal["run.finish"]]
    run_id: Required[str]
    trace_id: str
    status: Required[Literal["completed", "failed", "cancelled"]]
    ended_at: Required[str]
    output: Any  # JSON
    error_code: str
    error_details: Any  # JSON (REST: an object)
    failing_span_id: str  # "" or the span that made the run fail
    # OTLP: the root span ended OK, but an error inside that nothing recovered fails the run: the
    # projection decides the status from the spans.
    derive_status: bool


Record = RunStart | SpanRecord | SpanUpdate | RunFinish
RECORD_TYPES: dict[str, type] = {"run.start": RunStart, "span": SpanRecord, "span.update": SpanUpdate,
                                 "run.finish": RunFinish}
OPS = tuple(RECORD_TYPES)


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
    return settings.TRACES_MAX_FIELD_BYTES


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


def _id(value: Any, field: str, *, max_len: int = MAX_CHARS["run_id"]) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value) or len(value) > max_len:
        raise RecordError(field, f"must be 1-{max_len} characters of letters, digits, '.', '_', ':' or '-'.")
    return value


def _opt_id(value: Any, field: str, *, max_len: int = MAX_CHARS["span_id"]) -> str:
    if value in (None, ""):
        return ""
    return _id(value, field, max_len=max_len)


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


def cost(value: Any, field: str) -> str:
    """A reported cost in USD (a number or a decimal string), 0..MAX_COST_USD, kept to nine places."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecordError(field, "must be a number or a decimal string (USD).")
    try:
        amount = Decimal(str(value).strip()) if isinstance(value, str) else Decimal(repr(value))
    except InvalidOperation:
        raise RecordError(field, "must be a number or a decimal string (USD).") from None
    if not amount.is_finite() or amount < 0 or amount > MAX_COST_USD:
        raise RecordError(field, f"must be a finite amount of USD, 0..{MAX_COST_USD}.")
    return format_cost(amount)


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
        "agent_name": _str(agent.get("name"), "agent.name", max_len=MAX_CHARS["agent_name"]),
        "agent_version": _str(agent.get("version"), "agent.version", max_len=MAX_CHARS["agent_version"]),
        "input": _blob(data.get("input"), "input"),
        "end_user": _str(data.get("end_user"), "end_user", max_len=MAX_CHARS["end_user"]),
        "session_id": _str(data.get("session_id"), "session_id", max_len=MAX_CHARS["session_id"]),
        "parent_run_id": _opt_id(data.get("parent_run_id"), "parent_run_id", max_len=MAX_CHARS["parent_run_id"]),
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
        "error_code": _str(data.get("error_code"), "error_code", max_len=MAX_CHARS["error_code"]),
        "error_details": _blob(error_details, "error_details"),
        "failing_span_id": _opt_id(data.get("failing_span_id"), "failing_span_id"),
        "ended_at": _time(data["ended_at"], "ended_at") if data.get("ended_at") else received_at,
    }


def _usage(value: Any, field: str) -> dict:
    usage = _obj(value, field)
    unknown = set(usage) - set(TOKEN_FIELDS) - {"total_tokens"}
    if unknown:
        raise RecordError(f"{field}.{sorted(unknown)[0]}", f"is not a usage field ({', '.join(TOKEN_FIELDS)}).")
    return {k: _count(usage.get(k), f"{field}.{k}") for k in TOKEN_FIELDS if usage.get(k) is not None}


def _tool(value: Any, field: str, *, partial: bool) -> dict:
    tool = _obj(value, field)
    out: dict[str, Any] = {}
    if "name" in tool or not partial:
        out["name"] = _str(tool.get("name"), f"{field}.name", max_len=MAX_CHARS["tool.name"], allow_empty=False)
    if tool.get("call_id") is not None:
        out["call_id"] = _str(tool.get("call_id"), f"{field}.call_id", max_len=MAX_CHARS["tool.call_id"])
    for key in ("arguments", "result"):
        if key in tool:
            out[key] = _blob(tool[key], f"{field}.{key}")
    if tool.get("error") is not None:
        out["error"] = _str(tool.get("error"), f"{field}.error", max_len=MAX_CHARS["tool.error"])
    return out


def _events(value: Any, field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(field, "must be a list of {name, time, attributes}.")
    out = []
    for i, event in enumerate(value):
        event = _obj(event, f"{field}[{i}]")
        item = {"name": _str(event.get("name"), f"{field}[{i}].name", max_len=MAX_CHARS["event.name"],
                             allow_empty=False)}
        if event.get("time") is not None:
            item["time"] = _time(event["time"], f"{field}[{i}].time")
        if event.get("attributes") is not None:
            item["attributes"] = _map(event["attributes"], f"{field}[{i}].attributes")
        out.append(item)
    _blob(out, field)
    return out


_SPAN_TEXT = tuple((key, MAX_CHARS[key]) for key in ("status_message", "error_code", "component", "action", "provider",
                                                     "model", "response_model", "endpoint"))


def _span_fields(data: dict, prefix: str, *, partial: bool) -> dict:
    """The span's fields other than its identity; ``partial`` for a late update (all optional)."""
    out: dict[str, Any] = {}
    p = prefix

    if "kind" in data and data["kind"] is not None:
        if data["kind"] not in KINDS:
            raise RecordError(f"{p}kind", f"unknown kind {str(data['kind'])[:50]!r}; one of {', '.join(SpanKind.values)}.")
        out["kind"] = data["kind"]
    if data.get("name") is not None:
        out["name"] = _str(data["name"], f"{p}name", max_len=MAX_CHARS["name"], allow_empty=False)
    for key in ("start_time", "end_time"):
        if data.get(key) is not None:
            out[key] = _time(data[key], f"{p}{key}")
    if data.get("status") is not None:
        if data["status"] not in SPAN_STATUSES:
            raise RecordError(f"{p}status", "must be one of ok, error, unset.")
        out["status"] = data["status"]
    for key, max_len in _SPAN_TEXT:
        if data.get(key) is not None:
            out[key] = _str(data[key], f"{p}{key}", max_len=max_len)
    for key in ("retry_of", "fallback_of"):
        if data.get(key) not in (None, ""):
            out[key] = _id(data[key], f"{p}{key}", max_len=MAX_CHARS["span_id"])
    if data.get("details") is not None:
        out["details"] = _blob(data["details"], f"{p}details")
    for key in ("input_messages", "output_messages"):
        if data.get(key) is not None:
            out[key] = _blob(data[key], f"{p}{key}")
    if data.get("usage") is not None:
        out["usage"] = _usage(data["usage"], f"{p}usage")
    if data.get("time_to_first_token_ms") is not None:
        out["time_to_first_token_ms"] = _number(data["time_to_first_token_ms"], f"{p}time_to_first_token_ms")
    if data.get("cost_usd") is not None:
        out["cost_usd"] = cost(data["cost_usd"], f"{p}cost_usd")
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
    span["span_id"] = (_id(data["span_id"], f"{prefix}span_id", max_len=MAX_CHARS["span_id"]) if data.get("span_id")
                       else new_id())
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
    return {"op": "span.update", "run_id": _id(run_id, "run_id"),
            "span_id": _id(span_id, "span_id", max_len=MAX_CHARS["span_id"]), "fields": fields, "at": received_at}


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


# --- any producer's record, checked against the contract -------------------------------------------

# Each TypedDict's keys (``__annotations__`` holds its bases' too).
_DECLARED = {typed: frozenset(typed.__annotations__)
             for typed in (*RECORD_TYPES.values(), Span, SpanFields, Usage, Stream, Tool, Event)}


def _declared(value: dict, typed: type, prefix: str) -> None:
    """Refuse a key the contract does not declare: a producer's typo, or a field added to a producer
    and not to the contract (which every reader of records would then not know)."""
    keys = _DECLARED[typed]
    for key in value:
        if key not in keys:
            raise RecordError(f"{prefix}{key}", "is not a field of the record contract.")


def _declared_span(span: dict, typed: type, prefix: str) -> None:
    _declared(span, typed, prefix)
    for key, nested in (("usage", Usage), ("stream", Stream), ("tool", Tool)):
        if isinstance(span.get(key), dict):
            _declared(span[key], nested, f"{prefix}{key}.")
    for i, event in enumerate(span.get("events") or ()):
        _declared(event, Event, f"{prefix}events[{i}].")


def validate_record(rec: Any, field: str = "record") -> None:
    """Check one canonical record, from any producer (the REST builders above, the OTLP normaliser, a
    later one), against the contract: its keys are the TypedDicts' and its values are what the store
    can hold. Raises RecordError naming the field. Not on the accept paths (the REST builders check
    as they build; the normaliser builds within the limits): tests feed it every producer's output."""
    rec = _obj(rec, field)
    op = rec.get("op")
    if op not in OPS:
        raise RecordError(f"{field}.op", f"must be one of {', '.join(OPS)}.")
    _declared(rec, RECORD_TYPES[op], f"{field}.")
    _id(rec.get("run_id"), f"{field}.run_id")
    if rec.get("trace_id") is not None:
        _id(rec["trace_id"], f"{field}.trace_id", max_len=MAX_CHARS["trace_id"])
    for flag in ("fill", "derive_status"):
        if flag in rec and not isinstance(rec[flag], bool):
            raise RecordError(f"{field}.{flag}", "must be true or false.")
    if op == "run.start":
        for key in ("agent_name", "agent_version", "end_user", "session_id"):
            _str(rec.get(key), f"{field}.{key}", max_len=MAX_CHARS[key])
        _opt_id(rec.get("parent_run_id"), f"{field}.parent_run_id", max_len=MAX_CHARS["parent_run_id"])
        _blob(rec.get("input"), f"{field}.input")
        _map(rec.get("metadata"), f"{field}.metadata")
        if not rec.get("fill"):
            if rec.get("status", "running") not in RUN_START_STATUSES:
                raise RecordError(f"{field}.status", f"must be one of {', '.join(RUN_START_STATUSES)}.")
            _time(rec.get("started_at"), f"{field}.started_at")
    elif op == "span":
        span = _obj(rec.get("span"), f"{field}.span")
        prefix = f"{field}.span."
        _id(span.get("span_id"), f"{prefix}span_id", max_len=MAX_CHARS["span_id"])
        _opt_id(span.get("parent_span_id"), f"{prefix}parent_span_id")
        for key in ("name", "kind", "start_time"):
            if span.get(key) is None:
                raise RecordError(f"{prefix}{key}", "is required.")
        _span_fields(span, prefix, partial=False)
        _declared_span(span, Span, prefix)
    elif op == "span.update":
        _id(rec.get("span_id"), f"{field}.span_id", max_len=MAX_CHARS["span_id"])
        fields = _obj(rec.get("fields"), f"{field}.fields")
        _span_fields(fields, f"{field}.fields.", partial=True)
        _declared_span(fields, SpanFields, f"{field}.fields.")
        if rec.get("at") is not None:
            _time(rec["at"], f"{field}.at")
    else:
        if rec.get("status") not in RUN_FINISH_STATUSES:
            raise RecordError(f"{field}.status", f"must be one of {', '.join(RUN_FINISH_STATUSES)}.")
        _blob(rec.get("output"), f"{field}.output")
        _blob(rec.get("error_details"), f"{field}.error_details")
        _str(rec.get("error_code"), f"{field}.error_code", max_len=MAX_CHARS["error_code"])
        _opt_id(rec.get("failing_span_id"), f"{field}.failing_span_id")
        _time(rec.get("ended_at"), f"{field}.ended_at")


# --- redaction: which values of a record are free text ----------------------------------------------
# Keys whose values are structure (ids, enums, times, model and provider names, counts), never free
# text; every other value is scanned, so a field added to the contract is redacted until listed here.
# A run's ``end_user`` and ``session_id`` are kept too: the attribution the sender chose to give.
_STRUCTURE_RUN_START = frozenset({"op", "run_id", "trace_id", "agent_name", "agent_version", "end_user",
                                  "session_id", "parent_run_id", "status", "started_at", "fill"})
_STRUCTURE_RUN_FINISH = frozenset({"op", "run_id", "trace_id", "status", "error_code", "failing_span_id", "ended_at",
                                   "derive_status"})
_STRUCTURE_SPAN = frozenset({"span_id", "parent_span_id", "kind", "start_time", "end_time", "status", "error_code",
                             "provider", "model", "response_model", "retry_of", "fallback_of", "usage",
                             "time_to_first_token_ms", "stream", "component"})
# Maps of attributes: a key the project exempts (``Redactor.exempt``) keeps its value.
_EXEMPTABLE = frozenset({"attributes", "details", "metadata"})


def _redact_span(fields: dict, redactor: Redactor) -> dict:
    out = {}
    for key, value in fields.items():
        if key in _STRUCTURE_SPAN or value is None:
            out[key] = value
        elif key == "tool" and isinstance(value, dict):
            out[key] = {k: (v if k in ("name", "call_id") else redactor.value(v)) for k, v in value.items()}
        elif key == "events":
            out[key] = [_redact_event(e, redactor) for e in value] if isinstance(value, list) else redactor.value(value)
        else:
            out[key] = redactor.value(value, exemptable=key in _EXEMPTABLE)
    return out


def _redact_event(event: Any, redactor: Redactor) -> Any:
    if not isinstance(event, dict):
        return redactor.value(event)
    out = dict(event)
    if "name" in out:
        out["name"] = redactor.value(out["name"])
    if "attributes" in out:
        out["attributes"] = redactor.value(out["attributes"], exemptable=True)
    return out


def redact(record: dict, redactor: Redactor) -> dict:
    """The record as it may be stored: every free-text value through the project's ``redactor``
    (inputs, outputs, messages, tool arguments / results / errors, events, attributes, details,
    metadata, status messages, span names, endpoints); structure is left alone. A new dict: the
    record given is not changed. The projection calls it on every record before it is applied, so
    every producer's records are redacted the same way."""
    op = record.get("op")
    if op == "span":
        return {**record, "span": _redact_span(record["span"], redactor)}
    if op == "span.update":
        return {**record, "fields": _redact_span(record["fields"], redactor)}
    keep = _STRUCTURE_RUN_START if op == "run.start" else _STRUCTURE_RUN_FINISH if op == "run.finish" else None
    if keep is None:
        return record
    return {k: (v if k in keep or v is None else redactor.value(v, exemptable=k in _EXEMPTABLE))
            for k, v in record.items()}


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
