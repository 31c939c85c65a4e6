"""Read-only admins of the run log, for auditors.

Built for tables of millions of rows: no admin page runs an unbounded ``COUNT(*)`` (the paginator
counts at most ``COUNT_CAP`` rows, the full-count link is off), the date hierarchy lists calendar
periods instead of scanning for distinct dates, and related rows are joined (``list_select_related``).
Every list exports as CSV with its current filters and search (``export.csv``); each export is audited.
A staff member sees only the rows of projects they hold a role in.
"""
from __future__ import annotations

import csv
import datetime as dt
import json

from asgiref.sync import sync_to_async
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Min
from django.http import HttpResponseBadRequest, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html

from apps.audit.services import audit_record
from apps.projects.admin import ScopedAdminMixin, VisibleProjectFilter
from apps.projects.services import actor_for

from . import services
from .models import DeadRecord, IngestBatch, Run, Span, ToolCall

COUNT_CAP = 10_000
EXPORT_CHUNK = 2000
MAX_PERIODS = 100  # date hierarchy links at one level


class CappedCountPaginator(Paginator):
    """Counts at most COUNT_CAP rows (``SELECT COUNT(*) FROM (... LIMIT n)``): bounded work on any table.
    Past the cap, narrow the list with filters or the date hierarchy."""

    @cached_property
    def count(self) -> int:
        return self.object_list[:COUNT_CAP].count()


class CalendarQuerySet:
    """Mixed into the admin's queryset: the date hierarchy finds its periods by a loose index scan
    (the earliest row, then the earliest row after that period, ...: one indexed MIN per period that
    has rows) instead of ``SELECT DISTINCT date_trunc(...)`` over every row."""

    def datetimes(self, field_name, kind, order="ASC", tzinfo=None):
        qs = self.order_by()
        tz = timezone.get_current_timezone()
        periods: list[dt.datetime] = []
        lower = None
        while len(periods) < MAX_PERIODS:
            probe = qs if lower is None else qs.filter(**{f"{field_name}__gte": lower})
            first = probe.aggregate(first=Min(field_name))["first"]
            if first is None:
                break
            local = timezone.localtime(first, tz)
            if kind == "year":
                start = dt.datetime(local.year, 1, 1, tzinfo=tz)
                following = (local.year + 1, 1, 1) if local.year < dt.MAXYEAR else None
            elif kind == "month":
                start = dt.datetime(local.year, local.month, 1, tzinfo=tz)
                following = ((local.year + 1, 1, 1) if local.month == 12 else (local.year, local.month + 1, 1)) \
                    if (local.year, local.month) < (dt.MAXYEAR, 12) else None
            else:
                start = dt.datetime(local.year, local.month, local.day, tzinfo=tz)
                following = (start.date() + dt.timedelta(days=1)).timetuple()[:3] if start.date() < dt.date.max \
                    else None
            periods.append(start)
            if following is None:
                break
            lower = dt.datetime(*following, tzinfo=tz)
        return periods

    dates = datetimes


def _with_calendar(qs):
    qs.__class__ = type(f"Calendar{type(qs).__name__}", (CalendarQuerySet, type(qs)), {})
    return qs


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    elif isinstance(value, dt.datetime):
        value = value.isoformat()
    text = str(value)
    # A spreadsheet would run a cell starting with = + - @ as a formula: neutralise it.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class _Echo:
    def write(self, value):
        return value


class RunLogAdmin(ScopedAdminMixin, admin.ModelAdmin):
    """Read-only, scoped to the viewer's projects, bounded counts, CSV export of the filtered list."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    list_per_page = 100
    change_list_template = "admin/traces/change_list.html"
    export_fields: tuple[str, ...] = ()

    def get_queryset(self, request):
        return _with_calendar(super().get_queryset(request))

    # Read-only for everyone (the log is append-only); visible to staff holding a role in a project.
    view_by_role = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def may_reproject(self, request, project_id: int | None = None) -> bool:
        """Re-projection is for operators and admins of the record's project (superusers everywhere)."""
        return self.holds_perm(request, "operate_project", project_id)

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def get_urls(self):
        meta = self.model._meta
        return [path("export.csv", self.admin_site.admin_view(self.export_csv),
                     name=f"{meta.app_label}_{meta.model_name}_export"),
                *super().get_urls()]

    def export_csv(self, request):
        """The changelist's rows (its filters, search and ordering) as CSV, streamed."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            queryset = self.get_changelist_instance(request).get_queryset(request)
        except IncorrectLookupParameters:
            return HttpResponseBadRequest("Unknown filter.")
        fields = self.export_fields
        meta = self.model._meta
        with transaction.atomic():
            audit_record(actor=actor_for(request.user), action="traces.exported", object_type=meta.label_lower,
                         object_id="", object_repr=f"{meta.verbose_name_plural} CSV export",
                         after={"query": request.GET.urlencode()})
        writer = csv.writer(_Echo())
        ordered = queryset.order_by("-pk")

        def fetch(before_pk):
            page = ordered if before_pk is None else ordered.filter(pk__lt=before_pk)
            return list(page.values_list("pk", *fields)[:EXPORT_CHUNK])

        async def rows():
            # An async iterator, so that under ASGI the rows stream out chunk by chunk (Django would
            # read a sync iterator to the end into memory first); keyset pages keep each query cheap.
            yield writer.writerow(fields)
            before_pk = None
            while True:
                chunk = await sync_to_async(fetch)(before_pk)
                for row in chunk:
                    yield writer.writerow([_csv_cell(v) for v in row[1:]])
                if len(chunk) < EXPORT_CHUNK:
                    return
                before_pk = chunk[-1][0]

        response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
        stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
        response["Content-Disposition"] = f'attachment; filename="{meta.model_name}-{stamp}.csv"'
        return response


def _run_link(run_pk: int, label: str):
    return format_html('<a href="{}">{}</a>', reverse("admin:traces_run_change", args=[run_pk]), label)


@admin.register(Run)
class RunAdmin(RunLogAdmin):
    list_display = ("run_id", "project", "agent_name", "end_user", "status", "started_at", "duration_ms",
                    "span_count", "error_span_count", "total_tokens", "cost_usd")
    list_filter = ("status", VisibleProjectFilter, "start_received")
    list_select_related = ("project",)
    search_fields = ("=run_id", "=trace_id", "=end_user", "=session_id", "agent_name")
    search_help_text = "Exact run id, trace id, end user or session id; or part of an agent's name."
    date_hierarchy = "started_at"
    ordering = ("-started_at", "-id")
    export_fields = ("project__slug", "run_id", "trace_id", "agent_name", "agent_version", "end_user", "session_id",
                     "parent_run_ref", "status", "started_at", "ended_at", "duration_ms", "models_used",
                     "providers_used", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                     "reasoning_tokens", "cost_usd", "error_code", "failing_span_id", "span_count", "error_span_count")

    @admin.display(description="tokens")
    def total_tokens(self, run: Run) -> int:
        return run.total_tokens

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), "spans_link", "tool_calls_link"]

    @admin.display(description="spans")
    def spans_link(self, run: Run):
        url = reverse("admin:traces_span_changelist") + f"?run__id__exact={run.pk}"
        return format_html('<a href="{}">{} spans ({} errors)</a>', url, run.span_count, run.error_span_count)

    @admin.display(description="tool calls")
    def tool_calls_link(self, run: Run):
        url = reverse("admin:traces_toolcall_changelist") + f"?run__id__exact={run.pk}"
        return format_html('<a href="{}">tool calls</a>', url)


@admin.register(Span)
class SpanAdmin(RunLogAdmin):
    list_display = ("span_id", "run_link", "kind", "name", "status", "provider", "request_model", "start_time",
                    "end_time", "input_tokens", "output_tokens")
    list_filter = ("kind", "status", VisibleProjectFilter)
    list_select_related = ("run", "project")
    search_fields = ("=span_id", "=trace_id", "=run__run_id", "=request_model", "=error_code")
    search_help_text = "Exact span id, trace id, run id, model or error code."
    date_hierarchy = "start_time"
    ordering = ("-start_time", "-id")
    export_fields = ("project__slug", "run__run_id", "trace_id", "span_id", "parent_span_id", "kind", "name",
                     "start_time", "end_time", "status", "status_message", "error_code", "retry_of", "fallback_of",
                     "provider", "request_model", "response_model", "input_tokens", "output_tokens",
                     "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "time_to_first_token_ms")

    @admin.display(description="run", ordering="run__run_id")
    def run_link(self, span: Span):
        return _run_link(span.run_id, span.run.run_id)


@admin.register(ToolCall)
class ToolCallAdmin(RunLogAdmin):
    list_display = ("name", "call_id", "run_link", "status", "latency_ms", "started_at", "error")
    list_filter = ("status", VisibleProjectFilter)
    list_select_related = ("run", "project")
    search_fields = ("=name", "=call_id", "=run__run_id")
    date_hierarchy = "started_at"
    ordering = ("-started_at", "-id")
    export_fields = ("project__slug", "run__run_id", "span__span_id", "name", "call_id", "status", "latency_ms",
                     "error", "started_at", "arguments", "result")

    @admin.display(description="run", ordering="run__run_id")
    def run_link(self, tool_call: ToolCall):
        return _run_link(tool_call.run_id, tool_call.run.run_id)


class DeadLetterReasonFilter(admin.SimpleListFilter):
    """The reasons a batch can fail, from the code that sets them (no DISTINCT scan of the inbox)."""

    title = "error code"
    parameter_name = "error_code"
    CODES = ("invalid_record", "unknown_kind", "gave_up", "projection_error", "records_dead")

    def lookups(self, request, model_admin):
        return [(code, code) for code in self.CODES]

    def queryset(self, request, queryset):
        return queryset.filter(error_code=self.value()) if self.value() else queryset


@admin.register(IngestBatch)
class IngestBatchAdmin(RunLogAdmin):
    """The inbox: what was accepted, its projection state, and why a dead-lettered batch failed.
    The payload itself is not shown (raw input may hold what redaction would remove)."""

    list_display = ("id", "public_id", "project", "source", "kind", "status", "item_count", "attempts", "error_code", "created_at",
                    "processed_at")
    list_filter = ("status", "source", DeadLetterReasonFilter, VisibleProjectFilter)
    list_select_related = ("project",)
    search_fields = ("=public_id", "=idempotency_key")
    search_help_text = "The batch id a client was answered (a UUID), or its Idempotency-Key."
    date_hierarchy = "created_at"
    ordering = ("-id",)
    export_fields = ("id", "project__slug", "source", "kind", "status", "item_count", "attempts", "error_code", "error",
                     "created_at", "processed_at")

    def get_readonly_fields(self, request, obj=None):
        return [f for f in super().get_readonly_fields(request, obj) if f not in ("payload", "raw")]

    def get_fields(self, request, obj=None):
        return self.get_readonly_fields(request, obj)

    def get_queryset(self, request):
        return super().get_queryset(request).defer("payload", "raw")

    actions = ["reproject"]

    def has_reproject_permission(self, request) -> bool:
        return self.may_reproject(request)

    @admin.action(description="Re-project the selected dead batches", permissions=["reproject"])
    def reproject(self, request, queryset):
        done = skipped = 0
        for batch in queryset.filter(status=IngestBatch.Status.DEAD):
            if self.may_reproject(request, batch.project_id) and services.batch_reproject(
                    batch, actor=actor_for(request.user, batch.project)):
                done += 1
            else:
                skipped += 1
        self.message_user(request, f"{done} batches back in the inbox; {skipped} skipped.",
                          messages.SUCCESS if done else messages.WARNING)


@admin.register(DeadRecord)
class DeadRecordAdmin(RunLogAdmin):
    """Records the projection set aside so that the rest of their batch was stored: why, where from,
    and a redacted preview. The raw record is never shown; re-project it once the cause is fixed."""

    list_display = ("id", "project", "batch_public_id", "position", "op", "run_ref", "error_code", "status",
                    "created_at", "reprojected_at")
    list_filter = ("status", "error_code", "source", VisibleProjectFilter)
    list_select_related = ("project",)
    search_fields = ("=batch_public_id", "=run_ref")
    search_help_text = "The batch id a client was answered (a UUID), or a run id."
    date_hierarchy = "created_at"
    ordering = ("-id",)
    export_fields = ("id", "project__slug", "batch_public_id", "position", "source", "op", "run_ref", "error_code",
                     "error", "status", "created_at", "reprojected_at")
    actions = ["reproject"]

    def get_readonly_fields(self, request, obj=None):
        return [f for f in super().get_readonly_fields(request, obj) if f != "raw"]

    def get_fields(self, request, obj=None):
        return self.get_readonly_fields(request, obj)

    def get_queryset(self, request):
        return super().get_queryset(request).defer("raw")

    def has_reproject_permission(self, request) -> bool:
        return self.may_reproject(request)

    @admin.action(description="Re-project the selected dead records", permissions=["reproject"])
    def reproject(self, request, queryset):
        stored = failed = 0
        for record in queryset.filter(status=DeadRecord.Status.DEAD).select_related("project"):
            if not self.may_reproject(request, record.project_id):
                failed += 1
                continue
            if services.dead_record_reproject(record, actor=actor_for(request.user, record.project)):
                stored += 1
            else:
                failed += 1
        self.message_user(request, f"{stored} records stored; {failed} still dead (see their error).",
                          messages.SUCCESS if stored and not failed else messages.WARNING)
