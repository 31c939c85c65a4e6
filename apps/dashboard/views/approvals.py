"""The approvals inbox (``/approvals/``): what waits for a decision, live, with approve and reject for
those allowed (the buttons call the API: the decision is made, checked and audited there, never by the
page), and the history with filters; an approval's own page shows its arguments whole and its decisions."""
from __future__ import annotations

import json

from django.http import Http404
from django.shortcuts import render
from django.utils import timezone

from apps.approvals import selectors as approvals
from apps.approvals.models import Approval

from .base import Page

HISTORY_ROWS = 50
PREVIEW_CHARS = 240
DECIDED_STATES = [s for s in Approval.State.values if s != Approval.State.PENDING]


def _preview(value) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


def _rows(request, access, rows: list[Approval]) -> list[dict]:
    """Rows as the templates show them: the approval, its decisions, whether this person may decide it."""
    decisions = approvals.decisions_of_many(rows)
    allowed = approvals.may_decide(request.user, access, rows)
    now = timezone.now()
    return [{"a": a, "decisions": decisions[a.pk], "may_decide": allowed[a.pk], "age_ms": (now - a.created_at).total_seconds() * 1000,
             "overdue": a.overdue_at is not None and a.overdue_at <= now, "preview": _preview(a.arguments)}
            for a in rows]


class ApprovalInboxPage(Page):
    """``?fragment=pending`` answers the pending list only (re-read live on every change). A fixed number
    of queries: the pending rows, their decisions, the named approvers' permissions, the history page and
    its decisions (``approvals.selectors``)."""

    template_name = "dashboard/approvals.html"
    nav = "approvals"

    def pending_context(self) -> dict:
        project = self.project_param()
        rows = approvals.pending(principal=self.access, project_slug=project)
        return {"pending": _rows(self.request, self.access, rows), "pending_limit": approvals.INBOX_ROWS}

    def get(self, request, *args, **kwargs):
        if request.GET.get("fragment") == "pending":
            return render(request, "dashboard/_approvals_pending.html", {**self.pending_context(),
                                                                        **self.nav_context()})
        return super().get(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        project = self.project_param()
        state = self.request.GET.get("state") or None
        if state is not None and state not in DECIDED_STATES:
            raise Http404
        action = (self.request.GET.get("action") or "").strip()[:200] or None
        before = self.request.GET.get("before")
        before = int(before) if before and before.isdigit() else None
        rows, next_before = approvals.history(principal=self.access, project_slug=project, state=state,
                                              action=action, before=before, limit=HISTORY_ROWS)
        return {**super().get_context_data(**kwargs), **self.pending_context(),
                "history": _rows(self.request, self.access, rows), "next_before": next_before,
                "states": DECIDED_STATES, "state": state or "", "action": action or "",
                "live_url": "/ws/inbox/" + (f"?project={project}" if project else "")}


class ApprovalPage(Page):
    template_name = "dashboard/approval.html"
    nav = "approvals"

    def get_context_data(self, project: str, approval_id: str, **kwargs):
        try:
            found = approvals.approval(principal=self.access.in_project(project), approval_id=approval_id)
        except Http404:
            raise Http404 from None
        row = _rows(self.request, self.access, [found])[0]
        return {**super().get_context_data(**kwargs), "row": row, "project": project,
                "arguments": json.dumps(found.arguments, ensure_ascii=False, sort_keys=True, indent=2),
                "live_url": "/ws/inbox/?project=" + project}
