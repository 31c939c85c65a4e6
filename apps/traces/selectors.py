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
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection
from django.db.models import (
    Aggregate,
    BooleanField,
    Count,
    F,
    FloatField,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    TextField,
)
from django.db.models.expressions import RawSQL
from django.db.models.functions import Cast, TruncHour
from django.http import Http404
from django.utils import timezone

from apps.common.errors import ApiError, ErrorCode
from apps.projects.access import project_access

from . import topology
from .live import project_runs_group, run_group  # noqa: F401 - the live groups pages subscribe to
from .models import (
    LOOP_KINDS,
    TOKEN_FIELDS,
    DeadRecord,
    IngestBatch,
    Run,
    Span,
    SpanUpdate,
    ToolCall,
    cache_hit_rate,
)
from .projection import failing_spans
from .records import parse_time
from .spans import effective_spans, merge_span, span_to_record


def runs_visible_to(principal, *, project_slug: str | None = None) -> QuerySet[Run]:
    """Runs of the projects ``principal`` (an API key or a person) may see; optionally one project."""
    return Run.objects.visible_to(principal, project_slug=project_slug or None)


def _json_has(field: str, value: str) -> Q:
    """``value`` is an element of the JSON list in ``field``."""
    if connection.vendor == "postgresql":
        return Q(**{f"{field}__contains": [value]})
    # SQLite has no JSON containment: match the quoted element in the stored text.
    return Q(**{f"_{field}_text__contains": json.dumps(value)})


def _metadata_is(key: str, value: str) -> Q | RawSQL:
    """The run's ``metadata[key]`` is the string ``value`` (a number or a nested value never matches)."""
    if connection.vendor == "postgresql":
        return Q(metadata__contains={key: value})
    # SQLite has no JSON containment, and its JSON paths would read a key of digits as an array index:
    # compare the object's members one by one instead (json_each names each by its key, as stored).
    # The SQL names the run table: it holds for a query on runs, not for one where runs are a join.
    table = connection.ops.quote_name(Run._meta.db_table)
    return RawSQL(f"EXISTS (SELECT 1 FROM json_each({table}.metadata) AS m "
                  f"WHERE m.key = %s AND m.type = 'text' AND m.value = %s)", [key, value], output_field=BooleanField())


def run_list(*, principal, filters: dict[str, Any]) -> QuerySet[Run]:
    """Runs newest first, filtered. ``filters`` are validated values (see api.RunFilterSerializer):
    ``metadata`` is a list of (key, value) pairs, all of which must hold; ``has_loop`` True, False or None."""
    qs = runs_visible_to(principal, project_slug=filters.get("project")).select_related("project", "api_key")
    if filters.get("status"):
        qs = qs.filter(status__in=filters["status"])
    for key, column in (("agent", "agent_name"), ("agent_version", "agent_version"), ("end_user", "end_user"),
                        ("session_id", "session_id")):
        if filters.get(key):
            qs = qs.filter(**{column: filters[key]})
    if filters.get("has_loop") is not None:
        qs = qs.filter(has_loop=filters["has_loop"])
    for key, value in filters.get("metadata") or ():
        qs = qs.filter(_metadata_is(key, value))
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
                   .select_related("project", "parent_run", "api_key")[:2])
    if not matches:
        raise Http404
    if len(matches) > 1:
        raise ApiError(ErrorCode.INVALID_REQUEST, "Several of your projects have a run with this id; add ?project=.",
                       details={"field": "project", "projects": sorted(r.project.slug for r in matches)})
    return matches[0]


def session_runs(*, principal, session_id: str, project_slug: str | None = None) -> QuerySet[Run]:
    return (runs_visible_to(principal, project_slug=project_slug).filter(session_id=session_id)
            .select_related("project", "api_key"))


# --- the overview ---------------------------------------------------------------------------------------

OVERVIEW_LIST = 5  # rows in each list of the overview
SILENT_CANDIDATES = 50  # completed runs with error spans checked for an unrecovered one, newest first


def overview(*, principal, project_slug: str | None = None, hours: int = 24, now: datetime | None = None) -> dict:
    """What the overview page shows for the last ``hours``, for the runs ``principal`` may see.

    Every figure is bounded by the window and the (project, started_at) index, or by a small set
    (running runs, dead letters): nothing counts the whole run or span table. Ten queries."""
    now = now or timezone.now()
    since = now - timedelta(hours=hours)
    access = project_access(principal)
    if project_slug:
        access = access.in_project(project_slug)
    visible = Run.objects.visible_to(access)
    window = visible.filter(started_at__gte=since, started_at__lte=now)
    failed = (Run.Status.FAILED, Run.Status.LOST)

    by_hour = {row["hour"]: row for row in window.annotate(hour=TruncHour("started_at")).values("hour").annotate(
        runs=Count("id"), failed=Count("id", filter=Q(status__in=failed)),
        tokens=Sum(F("input_tokens") + F("output_tokens"))).order_by()}
    start_hour = since.replace(minute=0, second=0, microsecond=0)
    hourly = []
    for i in range(hours + 1):
        hour = start_hour + timedelta(hours=i)
        row = by_hour.get(hour) or {}
        hourly.append({"hour": hour, "runs": row.get("runs", 0), "failed": row.get("failed", 0),
                       "tokens": row.get("tokens") or 0})

    silent_candidates = list(window.filter(status=Run.Status.COMPLETED, error_span_count__gt=0)
                             .select_related("project").order_by("-started_at", "-id")[:SILENT_CANDIDATES])
    unrecovered = failing_spans([r.pk for r in silent_candidates])
    silent = [r for r in silent_candidates if unrecovered.get(r.pk)]
    for run in silent:
        run.silent_span_id = unrecovered[run.pk]

    return {
        "since": since, "until": now, "hours": hours, "hourly": hourly,
        "runs": sum(h["runs"] for h in hourly), "failed": sum(h["failed"] for h in hourly),
        "tokens": sum(h["tokens"] for h in hourly),
        "error_codes": list(window.filter(status__in=failed).values("error_code")
                            .annotate(runs=Count("id")).order_by("-runs", "error_code")[:OVERVIEW_LIST]),
        "recent_failures": list(window.filter(status__in=failed).select_related("project")
                                .order_by("-started_at", "-id")[:OVERVIEW_LIST]),
        "slowest": list(window.filter(duration_ms__isnull=False).select_related("project")
                        .order_by("-duration_ms", "-id")[:OVERVIEW_LIST]),
        "silent": silent[:OVERVIEW_LIST], "silent_count": len(silent),
        "silent_checked_all": len(silent_candidates) < SILENT_CANDIDATES,
        "running": list(visible.filter(status=Run.Status.RUNNING).select_related("project")
                        .order_by("-started_at", "-id")[:OVERVIEW_LIST]),
        "running_count": visible.filter(status=Run.Status.RUNNING).count(),
        "dead_batches": IngestBatch.objects.visible_to(access).filter(status=IngestBatch.Status.DEAD).count(),
        "dead_records": DeadRecord.objects.visible_to(access).filter(status=DeadRecord.Status.DEAD).count(),
    }


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
        "cost_usd": eff.get("cost_usd"),
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
    return _link_recoveries([_span_out(eff, updated=updated) for _, eff, updated in effective_spans(run)])


def _link_recoveries(spans: list[dict]) -> list[dict]:
    """Mark which attempt recovered which failed span (retries and fallbacks); then tree order."""
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


def child_runs_cost(run: Run) -> dict[str, Any]:
    """The runs this run started and their own costs, with their sum: shown beside a run's cost, never
    added into it (each run's cost is its own spans')."""
    runs = [{"run_id": rid, "cost_usd": cost} for rid, cost in Run.objects.filter(parent_run=run)
            .order_by("started_at", "id").values_list("run_id", "cost_usd")]
    priced = [r["cost_usd"] for r in runs if r["cost_usd"] is not None]
    return {"runs": runs, "cost_usd": sum(priced, Decimal(0)) if priced else None}


def run_usage(run: Run) -> dict[str, int]:
    usage = {name: getattr(run, name) for name in TOKEN_FIELDS}
    usage["total_tokens"] = run.total_tokens
    return usage


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- one run, for a page: the outline first, large values on demand ------------------------------------

# The outline of a span: everything a run's page draws (tree, timeline, topology), but none of the
# values that can be megabytes (messages, tool arguments and results, attributes, events, details but a
# loop's), which a page loads one span at a time.
OUTLINE_MESSAGE_CHARS = 300
# Aggregated to one JSON value in the database: decoding 5,000 rows of 20 typed columns cost ~125 ms in
# the driver, one JSON document a few (bench/RESULTS.md, "The audit UI"). Times as epoch seconds.
_OUTLINE_SQL = {
    "postgresql": """
        SELECT json_agg(json_build_array(span_id, parent_span_id, name, kind, extract(epoch FROM start_time),
            extract(epoch FROM end_time), status, left(status_message, %(chars)s), error_code, retry_of, fallback_of,
            provider, request_model, time_to_first_token_ms, {tokens}, tool->>'name', id) ORDER BY start_time, id)
        FROM {table} WHERE run_id = %(run)s""",
    "sqlite": """
        SELECT json_group_array(json(r)) FROM (SELECT json_array(span_id, parent_span_id, name, kind,
            (julianday(start_time) - 2440587.5) * 86400.0,
            CASE WHEN end_time IS NULL THEN NULL ELSE (julianday(end_time) - 2440587.5) * 86400.0 END,
            status, substr(status_message, 1, %(chars)s), error_code, retry_of, fallback_of, provider, request_model,
            time_to_first_token_ms, {tokens}, json_extract(tool, '$.name'), id) AS r
            FROM {table} WHERE run_id = %(run)s)""",
}
_OUTLINE_SET = frozenset({"name", "kind", "status", "error_code", "provider", "model", "time_to_first_token_ms"})


def _epoch(iso: str | None) -> float | None:
    return parse_time(iso).timestamp() if iso else None


def _outline_merge(span: dict, fields: dict) -> None:
    """Apply one late update to an outline span (the small fields only; ``spans.merge_span``'s rules)."""
    for key, value in fields.items():
        if key in ("parent_span_id", "retry_of", "fallback_of"):
            span[key] = value or None
        elif key in _OUTLINE_SET:
            span[key] = value
        elif key in ("start_time", "end_time"):
            span[key] = _epoch(value)
        elif key == "status_message":
            span[key] = value
        elif key == "usage":
            span["usage"] = {**dict.fromkeys(TOKEN_FIELDS), **(span["usage"] or {}), **value}
        elif key == "tool" and value.get("name"):
            span["tool"] = {"name": value["name"]}
        elif key == "details" and span["kind"] in LOOP_KINDS:
            span["details"] = value


def run_outline(run: Run) -> list[dict]:
    """A run's spans as its page draws them, in tree order with ``depth`` and ``children`` (as
    ``run_spans``), merged with their late updates, without their large values: a run of 5,000 spans,
    or of spans carrying megabytes, opens from this; ``span_effective`` loads one span in full.

    The keys are ``run_spans``' but for the values left out, and the times: ``start_time`` and
    ``end_time`` are epoch seconds (floats) here. Three queries: the spans (one JSON document), the
    loop spans' details (for the topology), the late updates."""
    with connection.cursor() as cursor:
        cursor.execute(_OUTLINE_SQL[connection.vendor].format(table=Span._meta.db_table, tokens=", ".join(TOKEN_FIELDS)),
                       {"run": run.pk, "chars": OUTLINE_MESSAGE_CHARS + 1})
        rows = cursor.fetchone()[0] or []
    if isinstance(rows, str):  # SQLite hands the document back as text
        rows = sorted(json.loads(rows), key=lambda r: (r[4], r[-1]))
    details = dict(Span.objects.filter(run=run, kind__in=LOOP_KINDS).values_list("span_id", "details"))
    updates = defaultdict(list)
    for span_id, fields in SpanUpdate.objects.filter(run=run).order_by("id").values_list("span_id", "fields"):
        updates[span_id].append(fields)
    out = []
    cut = OUTLINE_MESSAGE_CHARS
    for (span_id, parent, name, kind, start, end, status, message, error_code, retry_of, fallback_of, provider,
         model, ttft, *tokens, tool_name, _pk) in rows:
        span = {
            "span_id": span_id, "parent_span_id": parent or None, "name": name, "kind": kind, "start_time": start,
            "end_time": end, "status": status, "status_message": message, "error_code": error_code,
            "retry_of": retry_of or None, "fallback_of": fallback_of or None, "provider": provider, "model": model,
            "time_to_first_token_ms": ttft,
            "usage": dict(zip(TOKEN_FIELDS, tokens, strict=True)) if tokens.count(None) < len(tokens) else None,
            "tool": {"name": tool_name} if tool_name else None, "details": details.get(span_id) if details else None,
            "updated": span_id in updates,
        }
        if span["updated"]:
            for fields in updates[span_id]:
                _outline_merge(span, fields)
            start, end = span["start_time"], span["end_time"]
        span["duration_ms"] = round((end - start) * 1000, 3) if end is not None else None
        if span["status_message"] and len(span["status_message"]) > cut:
            span["status_message"] = span["status_message"][:cut] + "…"
        out.append(span)
    return _link_recoveries(out)


def span_effective(run: Run, span_id: str) -> dict | None:
    """One span of ``run`` in full (merged with its updates), or None. Two queries."""
    span = Span.objects.filter(run=run, span_id=span_id).first()
    if span is None:
        return None
    upd = list(SpanUpdate.objects.filter(run=run, span_id=span_id).order_by("id").values_list("fields", flat=True))
    return _span_out(merge_span(span_to_record(span), upd), updated=bool(upd))


RUN_PAGE_TOOL_CALLS = 100


def run_page(*, principal, run_id: str, project_slug: str) -> tuple[Run, dict[str, Any]]:
    """What a run's page shows, if the caller may see the run (else 404): the run with its parent, its
    child runs (with their status, live while they run), the span outline in tree order, the topology
    of its loops and its tool calls (names and status; arguments and results load with their span)."""
    run = run_get(principal=principal, run_id=run_id, project_slug=project_slug)
    spans = run_outline(run)
    children = list(Run.objects.filter(parent_run=run).order_by("started_at", "id")
                    .values("run_id", "agent_name", "status", "started_at", "duration_ms"))
    # The first tool calls as a table (every one of them is in the span tree too).
    tool_calls = list(ToolCall.objects.filter(run=run).order_by("started_at", "id")
                      .values("name", "status", "latency_ms", "started_at", "span__span_id")[:RUN_PAGE_TOOL_CALLS])
    has_loops = any(s["kind"] in LOOP_KINDS for s in spans)
    return run, {"spans": spans, "topology": topology.build(spans) if has_loops else {"loops": []},
                 "children": children, "tool_calls": tool_calls,
                 "more_tool_calls": sum(1 for s in spans if s["tool"]) - len(tool_calls)}


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


# --- for evaluators (server code acting for no one: callers scope the runs they pass) ---


def unrecovered_error_spans(run_pks: list[int]) -> dict[int, str]:
    """Per run, its latest error span that no retry or fallback recovered ('' if none): what a failed
    run names as its failing span, for runs that claim to have completed (evals' silent success)."""
    return failing_spans(run_pks)


def run_loops(run: Run) -> list[dict]:
    """A run's loops as its page draws them (``topology``): iterations with their verdicts, the winner."""
    return topology.build(run_outline(run))["loops"]


# --- agents and sessions ---

AGENT_STATS_WINDOW = timedelta(days=7)
AGENT_TOP_ERRORS = 3
SESSION_MAX_TURNS = 1000  # a session longer than this shows its first turns and says it was cut
SESSION_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


class _PercentileCont(Aggregate):
    """PostgreSQL's ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``; NULLs are skipped."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: str, *, fraction: float) -> None:
        super().__init__(expression, fraction=float(fraction))


def _percentile(ordered: list[float], fraction: float) -> float | None:
    """``percentile_cont`` computed in Python (linear between the two nearest ranks), for SQLite."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def agent_stats(*, principal, project_slug: str | None = None, since: datetime | None = None,
                until: datetime | None = None) -> list[dict[str, Any]]:
    """Per project, agent and version, the runs started in ``[since, until)`` (default: the last 7 days):
    how many, how many completed and failed (lost counts as failed; ``success_rate`` is completed over
    completed + failed, so runs still going or cancelled weigh neither way), the 50th and 95th
    percentile of the finished runs' durations, tokens, the cache hit rate (``models.cache_hit_rate``
    over the group's sums), when the version was first and last seen in the window, and its most
    common error codes.

    Sorted by project, agent, then newest version first (by first run), so a version change reads
    as a boundary between rows. A fixed number of queries whatever the number of agents, all on the
    run table (its (project, started_at) index bounds them to the window): the grouped totals and
    the grouped error codes; on SQLite, which has no ``percentile_cont``, a third reads the window's
    durations and the percentiles are computed here (bounded by the window)."""
    since = since or timezone.now() - AGENT_STATS_WINDOW
    runs = runs_visible_to(principal, project_slug=project_slug).filter(started_at__gte=since)
    if until is not None:
        runs = runs.filter(started_at__lt=until)
    group = ("project_id", "agent_name", "agent_version")
    totals: dict[str, Any] = {
        "runs": Count("pk"),
        "completed": Count("pk", filter=Q(status=Run.Status.COMPLETED)),
        "failed": Count("pk", filter=Q(status__in=(Run.Status.FAILED, Run.Status.LOST))),
        **{name: Sum(name) for name in SESSION_TOKENS},
        "first_started_at": Min("started_at"), "last_started_at": Max("started_at"),
    }
    postgres = connection.vendor == "postgresql"
    if postgres:
        totals |= {"p50_ms": _PercentileCont("duration_ms", fraction=0.5),
                   "p95_ms": _PercentileCont("duration_ms", fraction=0.95)}
    rows = list(runs.values(*group, "project__slug").annotate(**totals).order_by())
    if not rows:
        return []
    errors: dict[tuple, list[dict]] = defaultdict(list)
    for row in (runs.exclude(error_code="").values(*group, "error_code").annotate(count=Count("pk"))
                .order_by("-count", "error_code")):
        key = tuple(row[k] for k in group)
        if len(errors[key]) < AGENT_TOP_ERRORS:
            errors[key].append({"error_code": row["error_code"], "count": row["count"]})
    durations: dict[tuple, list[float]] = defaultdict(list)
    if not postgres:
        for *key, ms in (runs.filter(duration_ms__isnull=False).values_list(*group, "duration_ms")
                         .order_by("duration_ms")):
            durations[tuple(key)].append(ms)
    out = []
    for row in rows:
        key = tuple(row[k] for k in group)
        decided = row["completed"] + row["failed"]
        out.append({
            "project": row["project__slug"], "agent_name": row["agent_name"], "agent_version": row["agent_version"],
            "runs": row["runs"], "completed": row["completed"], "failed": row["failed"],
            "success_rate": row["completed"] / decided if decided else None,
            "p50_ms": row["p50_ms"] if postgres else _percentile(durations[key], 0.5),
            "p95_ms": row["p95_ms"] if postgres else _percentile(durations[key], 0.95),
            "input_tokens": row["input_tokens"], "output_tokens": row["output_tokens"],
            "cache_hit_rate": cache_hit_rate(row["input_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]),
            "first_started_at": row["first_started_at"], "last_started_at": row["last_started_at"],
            "top_errors": errors[key],
        })
    # Newest version first within an agent: sort on the negated timestamp (stable for the rest).
    out.sort(key=lambda r: (r["project"], r["agent_name"], -r["first_started_at"].timestamp(), r["agent_version"]))
    return out


def session_detail(*, principal, session_id: str, project_slug: str | None = None) -> dict[str, Any]:
    """One conversation: its runs as turns, oldest first, if the caller may see any (else 404).

    Each turn has its timing (``offset_ms`` from the first turn's start), status, tool call count,
    tokens and cache hit rate, and the session's running totals up to it (``cumulative``, the cache
    hit rate over the summed tokens). At most ``SESSION_MAX_TURNS`` turns (``truncated`` says when
    there were more), so a session of any length opens. Two queries: the runs (without their input
    and output), their tool call counts (grouped). Like ``run_get``, a person seeing several projects
    that hold this session id is asked to name the project."""
    runs = list(runs_visible_to(principal, project_slug=project_slug).filter(session_id=session_id)
                .select_related("project")
                .only("project__slug", "run_id", "agent_name", "agent_version", "status", "started_at", "ended_at",
                      "duration_ms", *SESSION_TOKENS)
                .order_by("started_at", "id")[:SESSION_MAX_TURNS + 1])
    if not runs:
        raise Http404
    projects = {run.project.slug for run in runs}
    if len(projects) > 1:
        raise ApiError(ErrorCode.INVALID_REQUEST, "Several of your projects have a session with this id; "
                                                  "add ?project=.",
                       details={"field": "project", "projects": sorted(projects)})
    truncated = len(runs) > SESSION_MAX_TURNS
    runs = runs[:SESSION_MAX_TURNS]
    tool_calls = dict(ToolCall.objects.filter(run_id__in=[run.pk for run in runs]).values("run_id")
                      .annotate(n=Count("pk")).order_by().values_list("run_id", "n"))
    first = runs[0].started_at
    cumulative = dict.fromkeys(SESSION_TOKENS, 0)
    turns = []
    for run in runs:
        tokens = {name: getattr(run, name) for name in SESSION_TOKENS}
        for name, value in tokens.items():
            cumulative[name] += value
        turns.append({
            "run_id": run.run_id, "agent": {"name": run.agent_name, "version": run.agent_version},
            "status": run.status, "started_at": run.started_at, "ended_at": run.ended_at,
            "offset_ms": (run.started_at - first).total_seconds() * 1000, "duration_ms": run.duration_ms,
            "tool_calls": tool_calls.get(run.pk, 0), "tokens": tokens, "cache_hit_rate": run.cache_hit_rate,
            "cumulative": {**cumulative, "cache_hit_rate": cache_hit_rate(
                cumulative["input_tokens"], cumulative["cache_read_tokens"], cumulative["cache_write_tokens"])},
        })
    return {
        "session_id": session_id, "project": runs[0].project.slug, "started_at": first,
        # From the first start to the latest end known (or start, for turns still going): the timeline's scale.
        "span_ms": max(t["offset_ms"] + (t["duration_ms"] or 0) for t in turns),
        "turn_count": len(turns), "truncated": truncated, "max_turns": SESSION_MAX_TURNS,
        "totals": turns[-1]["cumulative"], "turns": turns,
    }


def session_tool_calls(*, principal, session_id: str, project_slug: str | None = None) -> QuerySet[ToolCall]:
    """The tool calls of a session's runs the caller may see, oldest first (``started_at``, ``id``: the
    order cursor pagination walks), each with its run id, span id and project slug joined in."""
    return (ToolCall.objects.visible_to(principal, project_slug=project_slug).filter(run__session_id=session_id)
            .select_related("project", "run", "span")
            .only("project__slug", "run__run_id", "span__span_id", "name", "call_id", "arguments", "result",
                  "status", "latency_ms", "error", "started_at")
            .order_by("started_at", "id"))
