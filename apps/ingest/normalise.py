"""One normaliser for every tracing dialect: OpenTelemetry spans → the run log's canonical records.

Pure Python (no Django): the input is a *span view*, a plain dict decoded from OTLP by ``otlp.py``::

    {"trace_id": hex32, "span_id": hex16, "parent_span_id": hex16 | "", "name": str, "kind": int,
     "start_ns": int, "end_ns": int (0 = open), "status_code": 0 unset | 1 ok | 2 error,
     "status_message": str, "attributes": {key: value}, "events": [{"name", "time_ns", "attributes"}],
     "resource": {key: value}, "scope": str, "size": int (the span's encoded size, when known)}

and the output is the canonical records of ``apps.traces.records`` (``span``, ``run.start``,
``run.finish``: the TypedDicts there, within its limits). Dialects understood, current and deprecated spellings:

* OpenTelemetry GenAI (``gen_ai.*``): operation, provider/system, request/response model, tokens
  (incl. cache read/creation and reasoning), tools, agents, conversation, messages and system
  instructions (JSON strings or structured values; the older flattened ``gen_ai.prompt.N.*`` /
  ``gen_ai.completion.N.*`` and per-message events too), ``gen_ai.evaluation.result`` events.
* OpenInference (``openinference.span.kind``, ``llm.*``, ``input.value``/``output.value``,
  ``tool.*``, ``tool_call.*``, ``session.id``, ``user.id``, ``metadata``, ``tag.tags``,
  ``agent.name``, ``graph.node.*``).
* The loop convention ``tangle.loop.*`` (``loop``, ``loop.move`` and ``loop.iteration`` spans);
  their values land in ``details["loop"]`` for the topology (``apps.traces.topology``).

One OTLP trace is one run: ``run_id`` = the trace id. The root span starts (and by ending, finishes)
the run; any other span may *fill* run fields still blank (agent, end user, session). Attributes
that map onto a field leave the attribute map; everything else is kept verbatim.
"""
from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from apps.traces.records import (
    ID_RE,
    MAX_CHARS,
    MAX_DEPTH,
    MAX_FIELD_BYTES,
    MAX_TOKENS,
    STRICT_JSON,
    RecordError,
    json_problem,
)
from apps.traces.records import cost as record_cost

# OTel status codes
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

OPERATION_KIND = {
    "chat": "llm", "text_completion": "llm", "generate_content": "llm", "completion": "llm",
    "embeddings": "embedding", "embedding": "embedding",
    "execute_tool": "tool",
    "invoke_agent": "agent", "create_agent": "agent",
    "retrieval": "retriever",
}
OPENINFERENCE_KIND = {
    "LLM": "llm", "TOOL": "tool", "AGENT": "agent", "CHAIN": "chain", "RETRIEVER": "retriever",
    "RERANKER": "retriever", "EMBEDDING": "embedding", "GUARDRAIL": "guardrail", "EVALUATOR": "evaluator",
    "PROMPT": "step",
}

# Token counts: current spelling first, then deprecated ones, then OpenInference.
USAGE_ATTRS = {
    "input_tokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"),
    "output_tokens": ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion"),
    "cache_read_tokens": ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                          "llm.token_count.prompt_details.cache_read"),
    "cache_write_tokens": ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens",
                           "llm.token_count.prompt_details.cache_write"),
    "reasoning_tokens": ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens",
                         "llm.token_count.completion_details.reasoning"),
}
# OpenInference's total cost of an LLM call (USD); aggregating spans' costs are never counted.
COST_ATTR = "llm.cost.total"
TOTAL_TOKEN_ATTRS = ("gen_ai.usage.total_tokens", "llm.token_count.total")
PROVIDER_ATTRS = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
REQUEST_MODEL_ATTRS = ("gen_ai.request.model", "llm.model_name")
RESPONSE_MODEL_ATTRS = ("gen_ai.response.model",)
END_USER_ATTRS = ("enduser.id", "user.id", "gen_ai.user.id")
SESSION_ATTRS = ("session.id", "gen_ai.conversation.id")
AGENT_NAME_ATTRS = ("gen_ai.agent.name", "agent.name")
# Kinds whose token counts are totals over their children (counting them again would double a run).
AGGREGATE_KINDS = frozenset({"agent", "chain", "loop", "loop.move", "loop.iteration"})
MESSAGE_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                  "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
LOOP_PREFIX = "tangle.loop."
MAX_FIELD_CHARS = MAX_FIELD_BYTES  # one field's encoded size: the record contract's

_INDEXED_PREFIXES = ("llm.input_messages.", "llm.output_messages.", "gen_ai.prompt.", "gen_ai.completion.")
_INDEXED = re.compile(r"^(llm\.input_messages|llm\.output_messages|gen_ai\.prompt|gen_ai\.completion)\.(\d+)\.(.+)$")


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // 1000 / 1_000_000, UTC).isoformat()


def _first(attrs: dict, names: tuple[str, ...], used: set[str]) -> Any:
    if attrs.keys().isdisjoint(names):  # the usual case, settled in C
        return None
    for i, name in enumerate(names):
        value = attrs.get(name)
        if value is not None and value != "":
            used.add(name)
            # A synonym saying the same is mapped too; one saying otherwise stays as an attribute.
            used.update(other for other in names[i + 1:] if attrs.get(other) == value)
            return value
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        out = value
    elif isinstance(value, float) and math.isfinite(value):
        out = int(value)
    elif isinstance(value, str) and value.isdigit() and len(value) <= 20:
        out = int(value)
    else:
        return None
    # Out of the record contract's range: not a count, so it stays an attribute, verbatim.
    return out if 0 <= out <= MAX_TOKENS else None


def _cost(value: Any) -> str | None:
    """A reported cost as the record's decimal string; anything else stays an attribute, verbatim."""
    if value is None:
        return None
    try:
        return record_cost(value, "cost_usd")
    except RecordError:
        return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            return None
        return out if math.isfinite(out) else None
    return None


def _str(value: Any, limit: int) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text[:limit]


def json_or_text(value: Any) -> Any:
    """A JSON-encoded attribute (messages, arguments) decoded; anything else as it is. Text whose
    decoding the store could not hold (NaN, 1e400, an escaped NUL or lone surrogate, nesting past
    the record contract's depth) stays the text it came as."""
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped[:1] in ("[", "{"):
            try:
                decoded = STRICT_JSON.decode(value)  # NaN, 1e400: not decoded, the text stays
            except (ValueError, RecursionError):
                return value
            # The text is valid UTF-8 without NUL (protobuf and any_value saw to that): only an escape
            # can decode to NUL or half a surrogate, and only that many brackets can nest too deep.
            if _RISKY_ESCAPE.search(value) and json_problem(decoded, limit=MAX_FIELD_CHARS * 4):
                return value
            if value.count("[") + value.count("{") > MAX_DEPTH and json_problem(decoded, limit=MAX_FIELD_CHARS * 4):
                return value
            return decoded
    return value


_RISKY_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")  # an escaped NUL or UTF-16 surrogate half


def _bounded(value: Any) -> Any:
    """Keep one field under the store's per-field limit: an oversized value becomes a truncated string
    marked as such (the span is kept; its content is cut, visibly)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else None
    if text is not None and len(text) <= MAX_FIELD_CHARS // 4:
        return value
    encoded = text if text is not None else json.dumps(value, ensure_ascii=False, default=str)
    if len(encoded.encode()) <= MAX_FIELD_CHARS:
        return value
    return encoded[: MAX_FIELD_CHARS // 4] + f"… [truncated {len(encoded)} characters]"


def _as_is(value: Any) -> Any:
    return value


def _encoded_len(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, default=str).encode())


def _bounded_events(events: list) -> list:
    """Events under the per-field limit, still a list: each attribute value bounded, then as many
    events as fit, and a last one, ``controlplane.events_truncated``, telling how many were left out."""
    events = [{**e, "attributes": {k: _bounded(v) for k, v in e["attributes"].items()}} if e.get("attributes")
              else e for e in events]
    if _encoded_len(events) <= MAX_FIELD_CHARS:
        return events
    kept: list = []
    used = 2 + 200  # the brackets, and room for the marker event
    for event in events:
        size = _encoded_len(event) + 1
        if used + size > MAX_FIELD_CHARS:
            break
        kept.append(event)
        used += size
    kept.append({"name": "controlplane.events_truncated", "attributes": {"dropped": len(events) - len(kept)}})
    return kept


def _set_path(root: dict, parts: list[str], value: Any) -> None:
    """Set ``value`` at a dotted path inside nested dicts/lists (digits index lists)."""
    node: Any = root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt = None if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else None
            if idx is None or idx > 10_000:
                return
            while len(node) <= idx:
                node.append(None)
            if last:
                node[idx] = value
            else:
                if not isinstance(node[idx], (dict, list)):
                    node[idx] = nxt
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = nxt
                node = node[part]


def _indexed_messages(attrs: dict, used: set[str]) -> dict[str, list]:
    """Flattened message lists (``llm.input_messages.0.message.role``, ``gen_ai.prompt.0.content``)."""
    out: dict[str, dict[int, dict]] = {}
    for key, value in attrs.items():
        m = _INDEXED.match(key) if key.startswith(_INDEXED_PREFIXES) else None
        if not m:
            continue
        used.add(key)
        prefix, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        parts = [p for p in rest.split(".") if p not in ("message", "tool_call", "message_content")]
        if not parts:
            continue
        msg = out.setdefault(prefix, {}).setdefault(idx, {})
        _set_path(msg, parts, json_or_text(value) if parts[-1] == "arguments" else value)
    return {prefix: [msgs[i] for i in sorted(msgs)] for prefix, msgs in out.items()}


def _loop_kind(name: str, attrs: dict) -> str | None:
    has_loop = any(k.startswith(LOOP_PREFIX) for k in attrs)
    if name == "loop.move" or (has_loop and any(k.startswith(LOOP_PREFIX + "move.") for k in attrs)):
        return "loop.move"
    if name == "loop.iteration" or (has_loop and any(k.startswith(LOOP_PREFIX + "iteration.") for k in attrs)):
        return "loop.iteration"
    if name == "loop" or has_loop:
        return "loop"
    return None


def _loop_details(kind: str, attrs: dict, used: set[str]) -> dict:
    sub = {"loop.move": "move.", "loop.iteration": "iteration."}.get(kind, "")
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if not key.startswith(LOOP_PREFIX):
            continue
        used.add(key)
        rest = key[len(LOOP_PREFIX):]
        if sub and rest.startswith(sub):
            rest = rest[len(sub):]
        out[rest] = value
    return out


def span_kind(name: str, attrs: dict) -> str:
    loop = _loop_kind(name, attrs)
    if loop:
        return loop
    op = attrs.get("gen_ai.operation.name")
    if isinstance(op, str) and op in OPERATION_KIND:
        return OPERATION_KIND[op]
    oi = attrs.get("openinference.span.kind")
    if isinstance(oi, str) and oi.upper() in OPENINFERENCE_KIND:
        return OPENINFERENCE_KIND[oi.upper()]
    if attrs.get("gen_ai.tool.name") or attrs.get("tool.name"):
        return "tool"
    if any(attrs.get(k) for k in REQUEST_MODEL_ATTRS) or "gen_ai.system" in attrs:
        return "llm"
    return "other"


def _events(view: dict, used_names: set[str]) -> tuple[list, list, list, list]:
    """(events kept, input messages from events, output messages from events, evaluations)."""
    kept, inputs, outputs, evals = [], [], [], []
    for event in view.get("events") or ():
        name = event.get("name") or "event"
        attrs = event.get("attributes") or {}
        if name in MESSAGE_EVENTS:
            body = attrs.get("content", attrs.get("body"))
            inputs.append({"role": attrs.get("gen_ai.message.role") or MESSAGE_EVENTS[name],
                           "content": json_or_text(body)})
        elif name == "gen_ai.choice":
            body = attrs.get("message", attrs.get("content", attrs.get("body")))
            outputs.append({"role": "assistant", "content": json_or_text(body),
                            **({"finish_reason": attrs["finish_reason"]} if attrs.get("finish_reason") else {})})
        elif name == "gen_ai.evaluation.result":
            evals.append({k: v for k, v in {
                "name": attrs.get("gen_ai.evaluation.name"),
                "score": _float(attrs.get("gen_ai.evaluation.score.value")),
                "label": attrs.get("gen_ai.evaluation.score.label"),
                "explanation": attrs.get("gen_ai.evaluation.explanation"),
                "response_id": attrs.get("gen_ai.response.id"),
            }.items() if v is not None})
        item: dict[str, Any] = {"name": name[:MAX_CHARS["event.name"]]}
        if event.get("time_ns"):
            item["time"] = iso(event["time_ns"])
        if attrs:
            item["attributes"] = attrs
        kept.append(item)
    return kept, inputs, outputs, evals


def normalise_span(view: dict) -> tuple[dict, dict]:
    """One span view → (the canonical span dict, run hints).

    Run hints: ``{"agent_name", "agent_version", "end_user", "session_id", "metadata", "input",
    "output"}`` where the span tells them (used by ``trace_records``)."""
    attrs: dict = view.get("attributes") or {}
    used: set[str] = set()
    name = view.get("name") or ""
    # A span whose encoded size is known to be small cannot hold an oversized field: JSON takes at
    # most 8 bytes for each protobuf byte (a control character, \u0001, is the worst at 6), so the
    # per-field check (a json.dumps of every structured value) is skipped for it.
    size = view.get("size")
    bounded = _bounded if size is None or size * 8 > MAX_FIELD_CHARS else _as_is
    kind = span_kind(name, attrs)
    used.update(k for k in ("gen_ai.operation.name", "openinference.span.kind") if k in attrs)

    span: dict[str, Any] = {
        "span_id": view["span_id"], "parent_span_id": view.get("parent_span_id") or "",
        "name": name[:MAX_CHARS["name"]], "kind": kind, "start_time": iso(view["start_ns"]),
        "status": {STATUS_OK: "ok", STATUS_ERROR: "error"}.get(view.get("status_code", 0), "unset"),
    }
    if view.get("end_ns"):
        span["end_time"] = iso(max(view["end_ns"], view["start_ns"]))
    if view.get("status_message"):
        span["status_message"] = _str(view["status_message"], MAX_CHARS["status_message"])
    error_type = attrs.get("error.type")
    if error_type:
        used.add("error.type")
        span["error_code"] = _str(error_type, MAX_CHARS["error_code"])

    provider = _first(attrs, PROVIDER_ATTRS, used)
    if provider:
        span["provider"] = _str(provider, MAX_CHARS["provider"])
    model = _first(attrs, REQUEST_MODEL_ATTRS, used)
    if model:
        span["model"] = _str(model, MAX_CHARS["model"])
    response_model = _first(attrs, RESPONSE_MODEL_ATTRS, used)
    if response_model:
        span["response_model"] = _str(response_model, MAX_CHARS["response_model"])
    host = attrs.get("server.address")
    if host:
        port = attrs.get("server.port")
        span["endpoint"] = _str(f"{host}:{port}" if port else host, MAX_CHARS["endpoint"])
        used.update(("server.address", "server.port"))

    # Token counts. Aggregating spans (an agent's own totals) keep them as attributes only.
    if kind not in AGGREGATE_KINDS:
        usage = {}
        for field_name, names in USAGE_ATTRS.items():
            found = _first(attrs, names, used)
            value = _int(found)
            if value is not None:
                usage[field_name] = value
            elif found is not None:
                used.difference_update(names)  # not a count we can hold: it stays an attribute
        if usage:
            used.update(k for k in TOTAL_TOKEN_ATTRS if k in attrs)
            span["usage"] = usage
        reported = _cost(attrs.get(COST_ATTR))
        if reported is not None:
            used.add(COST_ATTR)
            span["cost_usd"] = reported
    elif kind == "loop.iteration":
        # The loop convention's node cost: an iteration is one attempt, its cost its own. (The loop's
        # total_cost_usd sums its iterations and is never counted.)
        reported = _cost(attrs.get(LOOP_PREFIX + "iteration.cost_usd"))
        if reported is not None:
            span["cost_usd"] = reported

    # Messages, current structured/JSON attributes first, then flattened ones, then events.
    indexed = _indexed_messages(attrs, used)
    events, event_inputs, event_outputs, evals = _events(view, used)
    input_messages = json_or_text(_first(attrs, ("gen_ai.input.messages",), used))
    if input_messages is None:
        input_messages = indexed.get("llm.input_messages") or indexed.get("gen_ai.prompt") or event_inputs or None
    instructions = json_or_text(_first(attrs, ("gen_ai.system_instructions",), used))
    if instructions is not None:
        system = {"role": "system", "parts": instructions if isinstance(instructions, list) else
                  [{"type": "text", "content": instructions}]}
        input_messages = [system, *(input_messages if isinstance(input_messages, list) else
                                    [] if input_messages is None else [input_messages])]
    output_messages = json_or_text(_first(attrs, ("gen_ai.output.messages",), used))
    if output_messages is None:
        output_messages = (indexed.get("llm.output_messages") or indexed.get("gen_ai.completion")
                           or event_outputs or None)
    input_value = attrs.get("input.value")
    output_value = attrs.get("output.value")
    if input_value is not None:
        used.update(k for k in ("input.value", "input.mime_type") if k in attrs)
    if output_value is not None:
        used.update(k for k in ("output.value", "output.mime_type") if k in attrs)

    if kind == "tool":
        tool: dict[str, Any] = {}
        tool_name = _first(attrs, ("gen_ai.tool.name", "tool.name", "tool_call.function.name"), used)
        tool["name"] = _str(tool_name or name, MAX_CHARS["tool.name"]) or "tool"
        call_id = _first(attrs, ("gen_ai.tool.call.id", "tool_call.id"), used)
        if call_id:
            tool["call_id"] = _str(call_id, MAX_CHARS["tool.call_id"])
        arguments = _first(attrs, ("gen_ai.tool.call.arguments", "tool_call.function.arguments", "tool.parameters"),
                           used)
        if arguments is None and input_value is not None:
            arguments = input_value
        if arguments is not None:
            tool["arguments"] = bounded(json_or_text(arguments))
        result = _first(attrs, ("gen_ai.tool.call.result",), used)
        if result is None and output_value is not None:
            result = output_value
        if result is not None:
            tool["result"] = bounded(json_or_text(result))
        if span["status"] == "error":
            tool["error"] = _str(view.get("status_message") or error_type or "error", MAX_CHARS["tool.error"])
        span["tool"] = tool
    else:
        if input_messages is None and input_value is not None:
            input_messages = json_or_text(input_value)
        if output_messages is None and output_value is not None:
            output_messages = json_or_text(output_value)
    if input_messages is not None:
        span["input_messages"] = bounded(input_messages)
    if output_messages is not None:
        span["output_messages"] = bounded(output_messages)

    details: dict[str, Any] = {}
    if kind.startswith("loop"):
        details["loop"] = _loop_details(kind, attrs, used)
    graph = {k[len("graph.node."):]: v for k, v in attrs.items() if k.startswith("graph.node.")}
    if graph:
        used.update("graph.node." + k for k in graph)
        details["graph_node"] = bounded(graph)
    if evals:
        details["evaluations"] = evals
    if view.get("links"):
        details["links"] = view["links"]
    if details:
        span["details"] = details

    # Run hints.
    hints: dict[str, Any] = {}
    agent_name = _first(attrs, AGENT_NAME_ATTRS, used)
    if agent_name:
        hints["agent_name"] = _str(agent_name, MAX_CHARS["agent_name"])
        if kind in ("agent", "chain"):
            span["component"] = _str(agent_name, MAX_CHARS["component"])
    agent_version = _first(attrs, ("gen_ai.agent.version",), used)
    if agent_version:
        hints["agent_version"] = _str(agent_version, MAX_CHARS["agent_version"])
    end_user = _first(attrs, END_USER_ATTRS, used)
    if end_user:
        hints["end_user"] = _str(end_user, MAX_CHARS["end_user"])
    session = _first(attrs, SESSION_ATTRS, used)
    if session:
        hints["session_id"] = _str(session, MAX_CHARS["session_id"])
    metadata: dict[str, Any] = {}
    if attrs.get("metadata") is not None:
        used.add("metadata")
        meta = bounded(json_or_text(attrs["metadata"]))
        metadata.update(meta if isinstance(meta, dict) else {"metadata": meta})
    if attrs.get("tag.tags") is not None:
        used.add("tag.tags")
        metadata["tags"] = bounded(attrs["tag.tags"])
    if attrs.get("gen_ai.agent.id"):
        used.add("gen_ai.agent.id")
        metadata["agent_id"] = attrs["gen_ai.agent.id"]
    if metadata:
        hints["metadata"] = metadata
    if input_messages is not None or input_value is not None:
        hints["input"] = input_value if input_value is not None else input_messages
    if output_messages is not None or output_value is not None:
        hints["output"] = output_value if output_value is not None else output_messages

    # Explicit recovery links (hex span ids of the failed attempt).
    for key, field_name in (("controlplane.retry_of", "retry_of"), ("controlplane.fallback_of", "fallback_of")):
        value = attrs.get(key)
        if isinstance(value, str) and ID_RE.fullmatch(value[:MAX_CHARS["span_id"]]):
            used.add(key)  # one that is no span id stays an attribute
            span[field_name] = value[:MAX_CHARS["span_id"]]

    rest = {k: v for k, v in attrs.items() if k not in used}
    if rest:
        span["attributes"] = {k: bounded(v) for k, v in rest.items()}
    if events:
        span["events"] = events if bounded is _as_is else _bounded_events(events)
    return span, hints


def _recoveries(spans: list[dict]) -> None:
    """Mark a failed model or tool call followed by a successful sibling as recovered: the same tool,
    or the same model, is a retry; another model or provider is a fallback. Siblings are spans with
    the same parent in this batch; an explicit ``controlplane.retry_of``/``fallback_of`` wins."""
    by_parent: dict[str, list[dict]] = {}
    for span in spans:
        if span["kind"] in ("llm", "tool", "embedding", "retriever"):
            by_parent.setdefault(span.get("parent_span_id", ""), []).append(span)
    for siblings in by_parent.values():
        if len(siblings) < 2 or not any(s["status"] == "error" for s in siblings):
            continue
        siblings.sort(key=lambda s: s["start_time"])
        for i, failed in enumerate(siblings):
            if failed["status"] != "error":
                continue
            for later in siblings[i + 1:]:
                if later["kind"] != failed["kind"] or later.get("retry_of") or later.get("fallback_of"):
                    continue
                if later["kind"] == "tool":
                    if later["tool"]["name"] != failed["tool"]["name"]:
                        continue
                    later["retry_of"] = failed["span_id"]
                elif (later.get("model"), later.get("provider")) == (failed.get("model"), failed.get("provider")):
                    later["retry_of"] = failed["span_id"]
                else:
                    later["fallback_of"] = failed["span_id"]
                break


def trace_records(views: list[dict], *, resource_metadata: bool = True) -> list[dict]:
    """The canonical records for span views of one or more traces (one run per trace).

    Per trace: a ``span`` record per span; for the root span a ``run.start`` (and, once it has
    ended, a ``run.finish``); for the other spans, one ``run.start`` with ``fill: True`` carrying the
    run fields they tell (filling blanks only, so a sub-agent never renames its run).
    """
    by_trace: dict[str, list[tuple[dict, dict, dict]]] = {}
    for view in views:
        span, hints = normalise_span(view)
        by_trace.setdefault(view["trace_id"], []).append((view, span, hints))

    records: list[dict] = []
    for trace_id, items in by_trace.items():
        _recoveries([span for _, span, _ in items])
        fill: dict[str, Any] = {}
        root: tuple[dict, dict, dict] | None = None
        for view, span, hints in items:
            if not span["parent_span_id"]:
                root = (view, span, hints)
                continue
            for key in ("agent_name", "agent_version", "end_user", "session_id"):
                if hints.get(key) and not fill.get(key):
                    # The outermost agent span names the run; nearer the root wins inside a batch.
                    fill[key] = hints[key]
            if hints.get("metadata"):
                fill.setdefault("metadata", {}).update(hints["metadata"])
        resource = items[0][0].get("resource") or {}
        if resource_metadata and resource:
            fill.setdefault("metadata", {})["resource"] = _bounded(resource)
        if not fill.get("agent_name") and resource.get("service.name") and root is None:
            fill["agent_name"] = _str(resource["service.name"], MAX_CHARS["agent_name"])
        if fill:
            records.append({"op": "run.start", "run_id": trace_id, "trace_id": trace_id, "fill": True,
                            **{k: v for k, v in fill.items()}})
        if root is not None:
            view, span, hints = root
            start = {"op": "run.start", "run_id": trace_id, "trace_id": trace_id,
                     "agent_name": hints.get("agent_name") or fill.get("agent_name")
                     or _str(resource.get("service.name"), MAX_CHARS["agent_name"]),
                     "agent_version": hints.get("agent_version", ""),
                     "end_user": hints.get("end_user", ""), "session_id": hints.get("session_id", ""),
                     "metadata": hints.get("metadata") or {}, "status": "running",
                     "started_at": span["start_time"]}
            if hints.get("input") is not None:
                start["input"] = _bounded(hints["input"])
            records.append(start)
        records.extend({"op": "span", "run_id": trace_id, "trace_id": trace_id, "span": span} for _, span, _ in items)
        if root is not None and root[1].get("end_time"):
            view, span, hints = root
            failed = span["status"] == "error"
            finish = {"op": "run.finish", "run_id": trace_id, "status": "failed" if failed else "completed",
                      "ended_at": span["end_time"], "error_code": span.get("error_code", ""),
                      # OK at the root but an unrecovered error inside: the projection decides.
                      "derive_status": not failed}
            if failed and span.get("status_message"):
                finish["error_details"] = {"message": span["status_message"]}
            if hints.get("output") is not None:
                finish["output"] = _bounded(hints["output"])
            records.append(finish)
    return records
