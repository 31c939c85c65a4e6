"""Every read of approvals, given the principal and scoped through ``visible_to`` (the one authorization
path). ``approval_json`` is the one shape of an approval, for the API, the long-poll and the webhooks."""
from __future__ import annotations

from datetime import datetime

from django.http import Http404
from django.utils import timezone

from .models import Approval, ApprovalRule, Decision, usd


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
        from . import services  # services import selectors for the webhooks' shape

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
