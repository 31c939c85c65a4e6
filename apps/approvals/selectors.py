"""Every read of approvals, given the principal and scoped through ``visible_to`` (the one authorization
path). ``approval_json`` is the one shape of an approval, for the API, the long-poll and the webhooks."""
from __future__ import annotations

from datetime import datetime

from django.db.models import Count, Min, Q
from django.http import Http404
from django.utils import timezone
from guardian.shortcuts import get_objects_for_user

from apps.projects.models import ROLE_PERMISSIONS

from . import services
from .models import Approval, ApprovalRule, ApproverRole, Decision, usd


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def approval_json(approval: Approval, decisions: list[Decision] | None = None) -> dict:
    """The API's shape of an approval (``decisions`` when given: who decided, with which role, why)."""
    cost = usd(approval.estimated_cost_nanos)
    out = {
        "id": approval.public_id, "project": approval.project.slug, "state": approval.state,
        "action": approval.action, "tool": approval.tool, "arguments": approval.arguments,
        "action_hash": approval.action_hash, "summary": approval.summary, "risk": approval.risk,
        "estimated_cost_usd": None if cost is None else f"{cost:.9f}", "agent": approval.agent_name,
        "end_user": approval.end_user, "run_id": approval.run_id, "span_id": approval.span_id,
        "rule": approval.rule_name or None, "approver_role": approval.approver_role, "quorum": approval.quorum,
        "approvals": approval.approvals, "created_at": _iso(approval.created_at),
        "expires_at": _iso(approval.expires_at), "decided_at": _iso(approval.decided_at),
        "consumed_at": _iso(approval.consumed_at), "reason": approval.closed_reason,
    }
    if decisions is not None:
        out["decisions"] = [{"decider": d.decider_username, "role": d.role, "outcome": d.outcome,
                             "reason": d.reason, "at": _iso(d.created_at)} for d in decisions]
    return out


def approval(*, principal, approval_id: str) -> Approval:
    """One approval the principal may see (a key: its project's), else 404. A pending approval past its
    deadline reads as expired even before the beat has recorded it."""
    found = Approval.objects.visible_to(principal).select_related("project", "rule").filter(
        public_id=approval_id).first()
    if found is None:
        raise Http404
    if found.state in (Approval.State.PENDING, Approval.State.APPROVED) and found.expires_at is not None \
            and found.expires_at <= timezone.now():
        services.expire(approval=found)
        found.refresh_from_db()
    return found


def decisions_of(approval_: Approval) -> list[Decision]:
    return list(approval_.decisions.all())


def approvals(*, principal, project_slug: str | None = None, state: str | None = None, run_id: str | None = None,
              before: int | None = None, limit: int = 50) -> list[Approval]:
    """The approvals the principal may see, newest first (keyset on the row id: ``before``)."""
    qs = Approval.objects.visible_to(principal, project_slug=project_slug).select_related("project")
    if state:
        qs = qs.filter(state=state)
    if run_id:
        qs = qs.filter(run_id=run_id)
    if before:
        qs = qs.filter(pk__lt=before)
    return list(qs.order_by("-pk")[:limit])


def rules_of_project(project) -> list[ApprovalRule]:
    return list(ApprovalRule.objects.filter(project=project).order_by("position", "id"))


# --- for the pages --------------------------------------------------------------------------------

INBOX_ROWS = 100
RUN_APPROVALS = 50


def _pending_qs(principal, project_slug):
    return Approval.objects.visible_to(principal, project_slug=project_slug).filter(state=Approval.State.PENDING)


def pending(*, principal, project_slug: str | None = None, limit: int = INBOX_ROWS) -> list[Approval]:
    """Pending approvals, oldest first (the ones waiting longest on top). A pending one past its deadline is
    left out: it is expired, whether or not the beat has recorded it yet."""
    now = timezone.now()
    return list(_pending_qs(principal, project_slug).exclude(expires_at__lte=now).select_related(
        "project", "api_key").order_by("created_at", "id")[:limit])


def pending_summary(*, principal, project_slug: str | None = None) -> dict:
    """How many wait, since when, and how many are overdue (past their rule's ``overdue_seconds``)."""
    now = timezone.now()
    row = _pending_qs(principal, project_slug).exclude(expires_at__lte=now).aggregate(
        count=Count("id"), oldest=Min("created_at"), overdue=Count("id", filter=Q(overdue_at__lte=now)))
    return {**row, "oldest_age": None if row["oldest"] is None else now - row["oldest"]}


def history(*, principal, project_slug: str | None = None, state: str | None = None, action: str | None = None,
            before: int | None = None, limit: int = 50) -> tuple[list[Approval], int | None]:
    """Approvals no longer pending (or of ``state``), newest first, a page at a time (keyset on the id):
    the rows and the cursor of the next page (None: the last page)."""
    qs = Approval.objects.visible_to(principal, project_slug=project_slug).select_related("project")
    qs = qs.filter(state=state) if state else qs.exclude(state=Approval.State.PENDING)
    if action:
        qs = qs.filter(action__startswith=action)
    if before:
        qs = qs.filter(pk__lt=before)
    rows = list(qs.order_by("-pk")[:limit + 1])
    return rows[:limit], (rows[limit - 1].pk if len(rows) > limit else None)


def decisions_of_many(approvals_: list[Approval]) -> dict[int, list[Decision]]:
    out: dict[int, list[Decision]] = {a.pk: [] for a in approvals_}
    if out:
        for d in Decision.objects.filter(approval_id__in=list(out)).order_by("created_at", "id"):
            out[d.approval_id].append(d)
    return out


def may_decide(user, access, approvals_: list[Approval]) -> dict[int, bool]:
    """Which of ``approvals_`` the person may decide now (as ``services.decider_role`` judges, with no query
    per row: the roles come with ``access``, the named approvers' permissions in one query), never their
    own requests. The decision itself checks again."""
    def perms(project_id) -> set[str]:
        return {p for role in access.roles.get(project_id, ()) for p in ROLE_PERMISSIONS.get(role, ())}

    pending_ = [a for a in approvals_ if a.state == Approval.State.PENDING]
    named = set()
    if pending_ and not user.is_superuser:
        named = set(get_objects_for_user(user, "approvals.decide_approval", klass=Approval.objects.filter(
            pk__in=[a.pk for a in pending_]), accept_global_perms=False, with_superuser=False).values_list(
            "pk", flat=True))
    out = {}
    for a in approvals_:
        if a.state != Approval.State.PENDING or services.is_requester(user, a):
            out[a.pk] = False
        elif user.is_superuser:
            out[a.pk] = True
        else:
            needed = "manage_project" if a.approver_role == ApproverRole.ADMIN else "approve_project"
            out[a.pk] = needed in perms(a.project_id) or a.pk in named
    return out


def approvals_of_run(run) -> dict:
    """A run's approvals (run already authorised), in the order they were asked, and how many."""
    qs = Approval.objects.filter(project_id=run.project_id, run_id=run.run_id)
    rows = list(qs.order_by("created_at", "id")[:RUN_APPROVALS])
    return {"rows": rows, "count": len(rows) if len(rows) < RUN_APPROVALS else qs.count()}
