"""The audit log page (``/audit/``): the audit events of the caller's projects, the chain's state, and
the filtered list exported as CSV or JSON.

Who sees what is the audit console's rule (``projects.admin.ScopedAuditEventAdmin``), through the same
``ProjectAccess.apply``: a person the events of the projects they hold a role in, a superuser every
event, project-less (system) ones included. The chain itself is global: its tip and its verification
cover every row, and show only positions, hashes and reasons, never another project's row.
"""
from __future__ import annotations

import csv
import json

from asgiref.sync import sync_to_async
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404, HttpResponseBadRequest, StreamingHttpResponse
from django.utils import timezone
from django.views import View

from apps.audit.selectors import audit_chain_report, audit_chain_tip, audit_event_page
from apps.audit.services import audit_record
from apps.projects.access import ProjectAccess
from apps.projects.services import actor_for

from ..forms import AuditFilterForm
from .base import Page, PageMixin

PAGE_SIZE = 50
EXPORT_CHUNK = 2000  # rows per query while an export streams
_MAX_SEQ = 2**63 - 1  # seq is a bigint: a larger cursor would be a database error, not an empty page
# What the chain hashes (``AuditEvent.content()``) and the hash: a JSON export is an exact copy whose
# every row's hash an auditor can recompute.
EXPORT_FIELDS = ("seq", "created_at", "project_id", "project_slug", "actor_type", "actor_id", "actor_repr",
                 "actor_role", "action", "object_type", "object_id", "object_repr", "before", "after",
                 "request_id", "prev_hash", "hash")


def _may_read_audit(access: ProjectAccess) -> bool:
    """A person holding any role; a superuser always (project-less rows are theirs even with no project)."""
    return access.everything or access.sees_any()


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= _MAX_SEQ):
        raise Http404
    return int(value)


class AuditLogPage(Page):
    """The caller's audit events, newest first, 50 a page, filtered by ``AuditFilterForm`` (its errors
    shown on the page, with no rows). ``?before=<seq>`` is the cursor of the "Older" link (keyset on
    ``seq``, no COUNT): one that is not a ``seq`` (digits, within bigint) is a 404, as the page never
    writes one, so it is a hand-edited link.

    POST (the "Verify the chain" button) walks the whole chain and shows the result on the page; any
    person with a role may, as it changes nothing (and so is not audited).
    """

    template_name = "dashboard/audit.html"
    nav = "audit"

    def post(self, request, *args, **kwargs):
        if not _may_read_audit(self.access):
            raise PermissionDenied
        return self.render_to_response(self.get_context_data(report=audit_chain_report()))

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        before = _cursor(self.request.GET.get("before"))
        form = AuditFilterForm(self.request.GET, access=self.access)
        events, next_before = [], None
        if form.is_valid():
            events, next_before = audit_event_page(form.scope(), form.audit_filters(), before=before,
                                                   size=PAGE_SIZE)
        may_read = _may_read_audit(self.access)
        return {**context, "form": form, "events": events, "next_before": next_before, "before": before,
                "may_read": may_read, "tip": audit_chain_tip() if may_read else None}


class _Echo:
    def write(self, value):
        return value


def _csv_cell(value) -> str:
    if value is None:
        return ""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    # A spreadsheet would run a cell starting with = + - @ as a formula: neutralise it.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _record(event) -> dict:
    return {**event.content(), "hash": event.hash}


class AuditExport(PageMixin, View):
    """``export.csv`` / ``export.json``: every event of the page's filtered list (``before`` is ignored),
    streamed in keyset chunks. JSON is the exact copy (each row's hash can be recomputed from it); CSV
    is for spreadsheets (before/after as JSON text, formula-like cells neutralised).

    The export is audited (``audit.exported``, the name pattern of the admin's ``traces.exported``) in
    its own transaction before the first byte is sent, under the filtered project when there is one so
    that project's auditors see it. Filters the form refuses: 400 with the reasons. Like the runs
    export, a person with no role gets a valid, empty document (and the attempt is audited).
    """

    def get(self, request, fmt: str):
        if fmt not in ("csv", "json"):
            raise Http404
        form = AuditFilterForm(request.GET, access=self.access)
        if not form.is_valid():
            reasons = "; ".join(f"{field}: {' '.join(errors)}" for field, errors in form.errors.items())
            return HttpResponseBadRequest(f"Invalid filters: {reasons}", content_type="text/plain; charset=utf-8")
        scope, filters = form.scope(), form.audit_filters()
        narrowed = form.cleaned_data["project"]
        project_id = next(iter(narrowed.roles)) if narrowed is not None else None
        with transaction.atomic():
            audit_record(actor=actor_for(request.user), action="audit.exported", object_type="audit.auditevent",
                         object_id="", object_repr=f"audit log {fmt.upper()} export", project_id=project_id,
                         project_slug=narrowed.slugs[project_id] if narrowed is not None else "",
                         after={"format": fmt, "query": request.GET.urlencode()})

        async def chunks():
            # An async iterator, so that under ASGI the rows stream out chunk by chunk (Django would read
            # a sync iterator to the end into memory first); keyset pages keep each query cheap.
            before = None
            while True:
                rows, before = await sync_to_async(audit_event_page)(scope, filters, before=before,
                                                                     size=EXPORT_CHUNK)
                yield rows
                if before is None:
                    return

        async def as_csv():
            writer = csv.writer(_Echo())
            yield writer.writerow(EXPORT_FIELDS)
            async for rows in chunks():
                yield "".join(writer.writerow([_csv_cell(r[f]) for f in EXPORT_FIELDS]) for r in map(_record, rows))

        async def as_json():
            yield "["
            separator = "\n"
            async for rows in chunks():
                if rows:
                    yield separator + ",\n".join(json.dumps(_record(r), ensure_ascii=False) for r in rows)
                    separator = ",\n"
            yield "\n]\n"

        stream, content_type = (as_csv(), "text/csv") if fmt == "csv" else (as_json(), "application/json")
        response = StreamingHttpResponse(stream, content_type=f"{content_type}; charset=utf-8")
        stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
        response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.{fmt}"'
        return response
