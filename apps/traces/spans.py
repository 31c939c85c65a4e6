"""The effective span: a stored span merged with its late updates, in the canonical record shape.

A :class:`Span` row is never rewritten; a late change is a :class:`SpanUpdate` merged on read. These
functions are the one definition of that merge and of what an effective span contributes to its run
(tokens, one span, one error or not). The projection, the run detail (``selectors``) and the totals
check (``services.run_totals_compute``) all use them.
"""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from .models import TOKEN_FIELDS, Run, Span, SpanUpdate, ToolCall
from .records import format_cost, parse_time


def span_to_record(span: Span) -> dict:
    """A stored span back in the canonical record shape (the inverse of ``span_row``)."""
    rec: dict[str, Any] = {
        "span_id": span.span_id, "parent_span_id": span.parent_span_id, "name": span.name, "kind": span.kind,
        "start_time": span.start_time.isoformat(), "status": span.status,
        "attributes": span.attributes or {}, "events": span.events or [],
    }
    if span.end_time is not None:
        rec["end_time"] = span.end_time.isoformat()
    for key in ("status_message", "error_code", "retry_of", "fallback_of", "component", "action", "provider",
                "response_model", "endpoint"):
        if getattr(span, key):
            rec[key] = getattr(span, key)
    if span.request_model:
        rec["model"] = span.request_model
    for key in ("details", "input_messages", "output_messages", "time_to_first_token_ms", "tool"):
        if getattr(span, key) is not None:
            rec[key] = getattr(span, key)
    if span.cost_usd is not None:
        rec["cost_usd"] = format_cost(span.cost_usd)
    usage = {k: getattr(span, k) for k in TOKEN_FIELDS if getattr(span, k) is not None}
    if usage:
        rec["usage"] = usage
    stream = {k: v for k, v in (("chunks", span.stream_chunks),
                                ("output_tokens_per_second", span.output_tokens_per_second)) if v is not None}
    if stream:
        rec["stream"] = stream
    return rec


def merge_span(base: dict, updates: list[dict]) -> dict:
    """Apply late updates in arrival order: maps merge, events append, everything else replaces."""
    if not updates:
        return base
    out = dict(base)
    for fields in updates:
        for key, value in fields.items():
            if key in ("attributes", "usage", "tool", "stream"):
                out[key] = {**(out.get(key) or {}), **value}
            elif key == "events":
                out["events"] = list(out.get("events") or []) + list(value)
            else:
                out[key] = value
    return out


def span_row(rec: dict, *, project_id: int, run: Run, trace_id: str, batch_id: int | None) -> dict:
    """A span record as a Span row ({attname: value}) for ``insert_rows``."""
    usage = rec.get("usage") or {}
    stream = rec.get("stream") or {}
    return {
        "project_id": project_id, "run_id": run.pk, "trace_id": trace_id, "span_id": rec["span_id"],
        "parent_span_id": rec.get("parent_span_id", ""), "name": rec["name"], "kind": rec["kind"],
        "start_time": parse_time(rec["start_time"]), "end_time": parse_time(rec.get("end_time")),
        "status": rec.get("status", "unset"), "status_message": rec.get("status_message", ""),
        "error_code": rec.get("error_code", ""), "retry_of": rec.get("retry_of", ""),
        "fallback_of": rec.get("fallback_of", ""), "component": rec.get("component", ""),
        "action": rec.get("action", ""), "details": rec.get("details"), "provider": rec.get("provider", ""),
        "request_model": rec.get("model", ""), "response_model": rec.get("response_model", ""),
        "endpoint": rec.get("endpoint", ""), "time_to_first_token_ms": rec.get("time_to_first_token_ms"),
        "cost_usd": Decimal(rec["cost_usd"]) if rec.get("cost_usd") is not None else None,
        "stream_chunks": stream.get("chunks"), "output_tokens_per_second": stream.get("output_tokens_per_second"),
        "input_messages": rec.get("input_messages"), "output_messages": rec.get("output_messages"),
        "tool": rec.get("tool"), "attributes": rec.get("attributes") or {}, "events": rec.get("events") or [],
        "batch_id": batch_id, **{k: usage.get(k) for k in TOKEN_FIELDS},
    }


# What an effective span adds to its run, in this order: the token counts, one span, one error or not.
CONTRIBUTION_FIELDS = (*TOKEN_FIELDS, "span_count", "error_span_count")


def contribution(eff: dict | None) -> tuple[int, ...]:
    """What one effective span (None: no span) adds to its run, as CONTRIBUTION_FIELDS."""
    if eff is None:
        return (0,) * len(CONTRIBUTION_FIELDS)
    usage = eff.get("usage") or {}
    return (*(usage.get(k) or 0 for k in TOKEN_FIELDS), 1, 1 if eff.get("status") == "error" else 0)


def tool_status(eff: dict) -> str:
    if eff.get("status") == "error" or (eff.get("tool") or {}).get("error"):
        return ToolCall.Status.ERROR
    if eff.get("end_time") or eff.get("status") == "ok":
        return ToolCall.Status.OK
    return ToolCall.Status.RUNNING


def latency_ms(eff: dict) -> float | None:
    if not eff.get("end_time"):
        return None
    return (parse_time(eff["end_time"]) - parse_time(eff["start_time"])).total_seconds() * 1000


def tool_call_values(eff: dict) -> dict[str, Any]:
    """The ToolCall fields of an effective span that names a tool."""
    tool = eff["tool"]
    return dict(name=tool["name"], call_id=tool.get("call_id", ""), arguments=tool.get("arguments"),
                result=tool.get("result"), status=tool_status(eff), latency_ms=latency_ms(eff),
                error=tool.get("error") or (eff.get("status_message", "") if eff.get("status") == "error" else ""),
                started_at=parse_time(eff["start_time"]))


def run_updates(run: Run) -> dict[str, list[dict]]:
    """A run's late span updates by span id, in arrival order (one query)."""
    updates: dict[str, list[dict]] = defaultdict(list)
    for span_id, fields in SpanUpdate.objects.filter(run=run).order_by("id").values_list("span_id", "fields"):
        updates[span_id].append(fields)
    return updates


def effective_spans(run: Run) -> list[tuple[Span, dict, bool]]:
    """Every span of a run as (row, effective span, updated or not), by start time (two queries)."""
    updates = run_updates(run)
    return [(s, merge_span(span_to_record(s), updates.get(s.span_id, [])), s.span_id in updates)
            for s in Span.objects.filter(run=run).order_by("start_time", "id")]
