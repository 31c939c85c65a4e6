"""Reads of the run log for the API and the pages: always scoped to what the caller may see.

A run's detail (``run_detail``) is built from a fixed number of queries whatever its size: the run, its
spans, its late span updates, its tool calls and its child runs (one query each). Spans are merged with
their updates (``spans.effective_spans``) and returned flat in tree order (depth-first, siblings by start time) with
``depth`` and ``children``: a UI draws the tree from that directly, and a 5,000-deep chain of spans
cannot overflow a recursive encoder.
"""
from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.http import Http404

from apps.common.errors import ApiError, ErrorCode

from . import topology
from .models import TOKEN_FIELDS, Run, ToolCall
from .records import parse_time
from .spans import effective_spans


def runs_visible_to(principal, *, project_slug: str | None = None) -> QuerySet[Run]:
    """Runs of the projects ``principal`` (an API key or a person) may see; optionally one project."""
    return Run.objects.visible_to(principal, project_slug=project_slug or None)


def _json_has(field: str, value: str) -> Q:
    """``value`` is an element of the JSON list in ``field``."""
    if connection.vendor == "postgresql":
        return Q(**{f"{field}__contains": [value]})
    # SQLite has no JSON containment: match the quoted element in the stored text.
    return Q(**{f"_{field}_text__contains": json.dumps(value)})


def run_list(*, principal, filters: dict[str, Any]) -> QuerySet[Run]:
    """Runs newest first, filtered. ``filters`` are validated values (see api.RunFilterSerializer)."""
    qs = runs_visible_to(principal, project_slug=filters.get("project")).select_related("project")
    if filters.get("status"):
        qs = qs.filter(status__in=filters["status"])
    for key, column in (("agent", "agent_name"), ("end_user", "end_user"), ("session_id", "session_id")):
        if filters.get(key):
            qs = qs.filter(**{column: filters[key]})
    if connection.vendor != "postgresql" and (filters.get("model") or filters.get("provider")):
        qs = qs.annotate(_models_used_text=Cast("models_used", TextField()),
                         _providers_used_text=Cast("providers_used", TextField()))
    if filters.get("model"):
        qs = qs.filter(_json_has("models_used", filters["model"]))
    if filters.get("provider"):
        qs = qs.filter(_json_has("providers_used", filters["provider"]))
    if filters.get("started_after"):
        qs = qs.filter(started_at__gte=filters["started_after"])
    if filters.get("started_before"):
        qs = qs.filter(started_at__lt=filters["started_before"])
    if filters.get("has_error") is True:
        qs = qs.filter(Q(status=Run.Status.FAILED) | Q(error_span_count__gt=0) | ~Q(error_code=""))
    elif filters.get("has_error") is False:
        qs = qs.exclude(status=Run.Status.FAILED).filter(error_span_count=0, error_code="")
    if filters.get("q"):
        qs = qs.annotate(_input_text=Cast("input", TextField())).filter(_input_text__icontains=filters["q"])
    return qs


def run_get(*, principal, run_id: str, project_slug: str | None = None) -> Run:
    """The run ``run_id`` if the caller may see it, else 404 (another project's run is not found).

    Run ids are unique per project; a person who sees several projects holding the same id is asked
    to name the project (``?project=``)."""
    matches = list(runs_visible_to(principal, project_slug=project_slug).filter(run_id=run_id)
                   .select_related("project", "parent_run")[:2])
    if not matches:
        raise Http404
    if len(matches) > 1:
        raise ApiError(ErrorCode.INVALID_REQUEST, "Several of your projects have a run with this id; add ?project=.",
                       details={"field": "project", "projects": sorted(r.project.slug for r in matches)})
    return matches[0]


def session_runs(*, principal, session_id: str, project_slug: str | None = None) -> QuerySet[Run]:
    return (runs_visible_to(principal, project_slug=project_slug).filter(session_id=session_id)
            .select_related("project"))


# --- one run in full -----------------------------------------------------------------------------------


def _ms(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((parse_time(end) - parse_time(start)).total_seconds() * 1000, 3)


def _span_out(eff: dict, *, updated: bool) -> dict:
    usage = eff.get("usage") or {}
    return {
        "span_id": eff["span_id"], "parent_span_id": eff.get("parent_span_id") or None,
        "kind": eff["kind"], "name": eff["name"],
        "start_time": eff["start_time"], "end_time": eff.get("end_time"),
        "duration_ms": _ms(eff.get("start_time"), eff.get("end_time")),
        "status": eff.get("status", "unset"), "status_message": eff.get("status_message", ""),
        "error_code": eff.get("error_code", ""),
        "retry_of": eff.get("retry_of") or None, "fallback_of": eff.get("fallback_of") or None,
        "component": eff.get("component", ""), "action": eff.get("action", ""), "details": eff.get("details"),
        "provider": eff.get("provider", ""), "model": eff.get("model", ""),
        "response_model": eff.get("response_model", ""), "endpoint": eff.get("endpoint", ""),
        "usage": {k: usage.get(k) for k in TOKEN_FIELDS} if usage else None,
        "time_to_first_token_ms": eff.get("time_to_first_token_ms"), "stream": eff.get("stream"),
        "input_messages": eff.get("input_messages"), "output_messages": eff.get("output_messages"),
        "tool": eff.get("tool"), "attributes": eff.get("attributes") or {}, "events": eff.get("events") or [],
        "updated": updated,
    }


def _tree_order(spans: list[dict]) -> list[dict]:
    """Depth-first order (siblings by start time, as given), with depth and children; iterative."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[str]] = defaultdict(list)
    for s in spans:
        parent = s["parent_span_id"] if s["parent_span_id"] in by_id else None
        children[parent].append(s["span_id"])
    out: list[dict] = []
    seen: set[str] = set()

    def walk(root: str) -> None:
        stack = [(root, 0)]
        while stack:
            sid, depth = stack.pop()
            if sid in seen:
                continue
            seen.add(sid)
            node = by_id[sid]
            node["depth"] = depth
            node["children"] = children.get(sid, [])
            out.append(node)
            stack.extend((c, depth + 1) for c in reversed(node["children"]))

    for root in children.get(None, []):
        walk(root)
    for s in spans:  # a parent cycle has no root: show those spans at the top level
        if s["span_id"] not in seen:
            walk(s["span_id"])
    return out


def run_spans(run: Run) -> list[dict]:
    """A run's effective spans (each merged with its updates) in tree order, with what recovered what."""
    spans = [_span_out(eff, updated=updated) for _, eff, updated in effective_spans(run)]
    by_id = {s["span_id"]: s for s in spans}
    for s in spans:
        for link, how in (("retry_of", "retry"), ("fallback_of", "fallback")):
            target = by_id.get(s[link]) if s[link] else None
            if target is None:
                continue
            # The error that triggered the retry or fallback, and whether this attempt recovered it.
            s["recovers"] = {"span_id": target["span_id"], "via": how, "status": target["status"],
                             "error_code": target["error_code"], "status_message": target["status_message"]}
            if s["status"] != "error":
                target["recovered_by"] = {"span_id": s["span_id"], "via": how}
    return _tree_order(spans)


def run_tool_calls(run: Run) -> list[dict]:
    rows = (ToolCall.objects.filter(run=run).order_by("started_at", "id")
            .values("name", "call_id", "arguments", "result", "status", "latency_ms", "error", "started_at",
                    "span__span_id"))
    return [{**{k: v for k, v in row.items() if k != "span__span_id"}, "span_id": row["span__span_id"]}
            for row in rows]


def run_children(run: Run) -> list[str]:
    return list(Run.objects.filter(parent_run=run).order_by("started_at", "id").values_list("run_id", flat=True))


def run_usage(run: Run) -> dict[str, int]:
    usage = {name: getattr(run, name) for name in TOKEN_FIELDS}
    usage["total_tokens"] = run.total_tokens
    return usage


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_detail(*, principal, run_id: str, project_slug: str | None = None) -> tuple[Run, dict[str, Any]]:
    """One run in full, if the caller may see it (else 404): the run, and beside it what the run's page
    and the API's run detail show: input, output, metadata, error details, child run ids, the span tree
    (``run_spans``), its topology and the tool calls."""
    run = run_get(principal=principal, run_id=run_id, project_slug=project_slug)
    spans = run_spans(run)
    return run, {
        "input": run.input, "output": run.output, "metadata": run.metadata, "error_details": run.error_details,
        "child_run_ids": run_children(run), "spans": spans, "topology": topology.build(spans),
        "tool_calls": [{**t, "started_at": iso(t["started_at"])} for t in run_tool_calls(run)],
    }
