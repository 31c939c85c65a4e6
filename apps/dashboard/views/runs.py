"""The runs list (live, filtered by its URL, exported as CSV or JSON) and a run's page (header,
timeline, tree, topology, live; one span's values loaded on demand)."""
from __future__ import annotations

import csv
import json
from datetime import datetime

from asgiref.sync import sync_to_async
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views import View

from apps.approvals import selectors as approvals
from apps.audit.services import audit_record
from apps.budgets import selectors as budgets
from apps.budgets.models import usd
from apps.evals import selectors as evals
from apps.projects.services import actor_for
from apps.traces import records, selectors

from .. import cursor, filters, outline, svg
from ..outline import display_status
from .base import Page, PageMixin

PAGE_SIZE = 50
EXPORT_CHUNK = 1000
# A value larger than this (as JSON) shows as a preview with a link to the whole value.
INLINE_BYTES = 64 * 1024
EXPORT_FIELDS = ("project__slug", "run_id", "trace_id", "agent_name", "agent_version", "end_user", "session_id",
                 "parent_run_ref", "status", "started_at", "ended_at", "duration_ms", "models_used", "providers_used",
                 "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
                 "span_count", "error_span_count", "error_code", "cost_usd")
SPAN_FIELDS = ("input_messages", "output_messages", "tool", "attributes", "events", "details")
RUN_FIELDS = ("input", "output", "metadata", "error_details")


def _live_query(request) -> str:
    """The page's filters without its cursor: what the live consumer matches new runs against."""
    query = request.GET.copy()
    for key in ("after", "fragment"):
        query.pop(key, None)
    return query.urlencode()


class RunListPage(Page):
    """Runs newest first, ``PAGE_SIZE`` a page by cursor (``?after=``); the filters live in the URL.
    ``?fragment=rows`` answers only the table's rows (a reconnecting live page re-reads them)."""

    template_name = "dashboard/runs.html"
    nav = "runs"

    def get(self, request, *args, **kwargs):
        form = filters.parse(request.GET)
        rows, next_cursor = [], None
        if form.is_valid():
            rows, next_cursor = cursor.page(filters.apply(self.access, form), request.GET.get("after"),
                                            size=PAGE_SIZE)
            with_scores(rows)
        context = {"form": form, "runs": rows, "next_cursor": next_cursor,
                   "first_page": not request.GET.get("after"), "live_query": _live_query(request)}
        if request.GET.get("fragment") == "rows":
            return render(request, "dashboard/_run_rows.html",
                          {**context, "show_project": len(self.visible_projects) != 1})
        return self.render_to_response(self.get_context_data(**kwargs, **context))


def with_scores(runs: list) -> list:
    """Each run with its scores' summary (``run.eval_summary``: passed, failed, errors), for its row."""
    summaries = evals.score_summaries([r.pk for r in runs]) if runs else {}
    for run in runs:
        run.eval_summary = summaries.get(run.pk)
    return runs


def _cell(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value  # a cell a spreadsheet would run as a formula is kept as text
    return value


class _Echo:
    def write(self, value):
        return value


class RunListExport(PageMixin, View):
    """The filtered runs (all pages) as CSV or JSON, streamed in keyset chunks; the export is audited."""

    def get(self, request, fmt: str):
        if fmt not in ("csv", "json"):
            raise Http404
        form = filters.parse(request.GET)
        if not form.is_valid():
            return HttpResponse("Invalid filters: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()),
                                status=400, content_type="text/plain; charset=utf-8")
        return _export(request, filters.apply(self.access, form), fmt)


def _export(request, queryset, fmt: str) -> StreamingHttpResponse:
    with transaction.atomic():
        audit_record(actor=actor_for(request.user), action="traces.exported", object_type="traces.run",
                     object_id="", object_repr=f"runs {fmt.upper()} export", after={"query": request.GET.urlencode()})

    def fetch(after):
        page = queryset if after is None else queryset.filter(Q(started_at__lt=after[0]) |
                                                              Q(started_at=after[0], pk__lt=after[1]))
        return list(page.order_by("-started_at", "-id").values_list("pk", "started_at", *EXPORT_FIELDS)[:EXPORT_CHUNK])

    writer = csv.writer(_Echo())

    async def chunks():
        # An async iterator: under ASGI the rows stream out chunk by chunk (Django would read a sync
        # iterator to the end into memory first); keyset pages keep each query cheap.
        yield writer.writerow(EXPORT_FIELDS) if fmt == "csv" else "["
        after, first = None, True
        while True:
            rows = await sync_to_async(fetch)(after)
            for row in rows:
                values = row[2:]
                if fmt == "csv":
                    yield writer.writerow([_cell(v) for v in values])
                else:
                    yield ("" if first else ",\n") + json.dumps(dict(zip(EXPORT_FIELDS, values, strict=True)),
                                                                 cls=DjangoJSONEncoder, ensure_ascii=False)
                    first = False
            if len(rows) < EXPORT_CHUNK:
                break
            after = (rows[-1][1], rows[-1][0])
        if fmt == "json":
            yield "]\n"

    content_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    response = StreamingHttpResponse(chunks(), content_type=content_type)
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="runs-{stamp}.{fmt}"'
    return response


# --- one run --------------------------------------------------------------------------------------------


def _run_id(value: str) -> str:
    if not records.ID_RE.fullmatch(value):
        raise Http404
    return value


def _preview(value) -> dict:
    """A value for the page: pretty JSON when small, else its first ``INLINE_BYTES`` and its size."""
    text = json.dumps(value, indent=2, ensure_ascii=False, cls=DjangoJSONEncoder)
    size = len(text.encode())
    if size <= INLINE_BYTES:
        return {"text": text, "size": size, "truncated": False}
    return {"text": text[:INLINE_BYTES] + "\n…", "size": size, "truncated": True}


class RunPage(Page):
    """A run: header, timeline, span tree, loop graphs, child runs, live while it runs. ``?span=``
    opens that span's panel; ``?fragment=body`` answers the live part only (re-read on each message)."""

    template_name = "dashboard/run.html"
    nav = "runs"

    def get(self, request, *args, project: str, run_id: str, **kwargs):
        run, page = selectors.run_page(principal=self.access, run_id=_run_id(run_id), project_slug=project)
        now = timezone.now()
        selected = request.GET.get("span") or None
        span_costs = budgets.span_costs_of_run(run)
        context = {
            "run": run, "project": project, **page, "selected": selected, "cost": _run_cost(run, page, span_costs),
            "timeline": svg.timeline(page["spans"], run_start=run.started_at, run_end=run.ended_at, now=now),
            "tree": outline.span_tree(page["spans"], selected=selected, costs=span_costs),
            "graphs": [{"loop": loop, "svg": svg.loop_graph(loop, key=str(n)), "key": str(n)}
                       for n, loop in enumerate(page["topology"]["loops"])],
            "values": {name: _preview(getattr(run, name)) for name in RUN_FIELDS if getattr(run, name) not in (None, {}, [])},
            "live_url": f"/ws/runs/{project}/{run.run_id}/",
            "reservations": budgets.reservations_of_run(run),
            "approvals": approvals.approvals_of_run(run),
            "scores": (scores := evals.run_scores(run)),
            "may_score": evals.may_score(request.user, self.access, run.project_id),
            "my_feedback": evals.feedback_of(scores, request.user),
        }
        if request.GET.get("fragment") == "body":
            return render(request, "dashboard/_run_body.html", context)
        return self.render_to_response(self.get_context_data(**kwargs, **context))


def _run_cost(run, page: dict, span_costs: dict) -> dict:
    """The run page's cost: the run's own (its spans'), its child runs' beside it (never added in; read
    only when it has children), and how many of its calls went unpriced or disagree with their tokens."""
    children = selectors.child_runs_cost(run) if page["children"] else {"runs": [], "cost_usd": None}
    return {"own": run.cost_usd, "children": children["cost_usd"], "child_count": len(children["runs"]),
            "child_costs": {c["run_id"]: c["cost_usd"] for c in children["runs"]},
            "unpriced": sum(1 for c in span_costs.values() if c.cost_nanos is None),
            "disagreements": sum(1 for c in span_costs.values() if c.disagreement)}


def _conversation(messages) -> list[dict] | None:
    """Chat messages as a person reads them (role, then text; anything else as JSON), or None when the
    value is not a list of messages. System instructions and reasoning keep their role as sent."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    out = []
    for m in messages:
        content = m.get("content", m.get("parts"))
        extra = {k: v for k, v in m.items() if k not in ("role", "content", "parts")}
        out.append({"role": str(m.get("role") or "?"), "text": content if isinstance(content, str) else None,
                    "json": None if isinstance(content, str) else _preview(content)["text"],
                    "extra": _preview(extra)["text"] if extra else None})
    return out


class SpanPanel(PageMixin, View):
    """One span in full (its values previewed; a larger one links to ``SpanField``), for the run page."""

    def get(self, request, project: str, run_id: str, span_id: str):
        run = selectors.run_get(principal=self.access, run_id=_run_id(run_id), project_slug=project)
        span = selectors.span_effective(run, span_id)
        if span is None:
            raise Http404
        values = {name: _preview(span[name]) for name in SPAN_FIELDS if span.get(name) not in (None, {}, [])}
        conversation = [(label, _conversation(span[name])) for name, label in (("input_messages", "Input messages"),
                                                                              ("output_messages", "Output messages"))
                        if name in values and not values[name]["truncated"]]
        cost = budgets.span_cost_of(run, span["span_id"])
        return render(request, "dashboard/_span_panel.html", {
            "run": run, "project": project, "span": span, "values": values, "status": display_status(span),
            "cost": cost, "cost_figures": _span_cost_figures(cost),
            "conversation": [(label, msgs) for label, msgs in conversation if msgs]})


def _span_cost_figures(cost) -> dict | None:
    if cost is None:
        return None
    return {"cost": cost.cost_usd, "computed": usd(cost.computed_nanos), "reported": usd(cost.reported_nanos)}


class SpanField(PageMixin, View):
    """One large value of a span (``field`` in ``SPAN_FIELDS``), or of the run itself (``span_id`` "-",
    ``field`` in ``RUN_FIELDS``), whole, as JSON."""

    def get(self, request, project: str, run_id: str, span_id: str, field: str):
        run = selectors.run_get(principal=self.access, run_id=_run_id(run_id), project_slug=project)
        if span_id == "-" and field in RUN_FIELDS:
            return JsonResponse(getattr(run, field), safe=False, json_dumps_params={"ensure_ascii": False})
        if field not in SPAN_FIELDS:
            raise Http404
        span = selectors.span_effective(run, span_id)
        if span is None:
            raise Http404
        return JsonResponse(span[field], safe=False, json_dumps_params={"ensure_ascii": False})


class RunExport(PageMixin, View):
    """The whole run as JSON (what ``GET /api/v1/runs/{id}`` answers); the export is audited."""

    def get(self, request, project: str, run_id: str):
        return _run_export(request, selectors.run_detail(principal=self.access, run_id=_run_id(run_id),
                                                         project_slug=project), project)


def _run_export(request, found, project: str) -> HttpResponse:
    run, detail = found
    with transaction.atomic():
        audit_record(actor=actor_for(request.user), action="traces.exported", object_type="traces.run",
                     object_id=run.pk, object_repr=f"run {run.run_id} JSON export", project_id=run.project_id,
                     project_slug=project)
    body = {"project": project, "run_id": run.run_id, "trace_id": run.trace_id, "status": run.status,
            "agent": run.agent_name, "agent_version": run.agent_version, "end_user": run.end_user,
            "session_id": run.session_id, "started_at": run.started_at, "ended_at": run.ended_at,
            "duration_ms": run.duration_ms, "usage": selectors.run_usage(run), "cost_usd": run.cost_usd,
            "error_code": run.error_code,
            "models": run.models_used, "providers": run.providers_used, **detail}
    response = HttpResponse(json.dumps(body, cls=DjangoJSONEncoder, ensure_ascii=False, indent=1),
                            content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="run-{run.run_id}.json"'
    return response
