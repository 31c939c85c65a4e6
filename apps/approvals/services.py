"""Every write of approvals: rules (people, audited), requests (agents), decisions (people, audited),
consume and cancel (agents), expiry (the beat).

Every state change is one conditional update (``WHERE state = …``): two decisions at the same instant
leave exactly one outcome, a repeated consume finds nothing to consume, and nothing ever becomes
``approved`` but by a decision. Requests, decisions and consumes are recorded on the run's trace as
``guardrail`` spans (through the run log's inbox, in the same transaction).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone
from guardian.core import ObjectPermissionChecker
from guardian.shortcuts import assign_perm

from apps.audit.services import audit_record
from apps.common.errors import ApiError, ErrorCode
from apps.projects.models import ApiKey, Project, url_allowed
from apps.projects.services import actor_for, audit_change, update_audited
from apps.traces import records
from apps.traces import services as traces

from . import grants, live
from .models import MAX_ARGUMENTS_BYTES, Approval, ApprovalRule, ApproverRole, Decision

State = Approval.State

# --- the action hash ------------------------------------------------------------------------------


def canonical_json(value) -> bytes:
    """The one serialisation the action hash is computed over: keys sorted, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def action_hash(action: str, arguments) -> str:
    """SHA-256 (hex) over the canonical JSON of ``{"action": name, "arguments": arguments}``."""
    return hashlib.sha256(canonical_json({"action": action, "arguments": arguments})).hexdigest()


def validate_arguments(arguments) -> None:
    problem = records.json_problem(arguments, limit=MAX_ARGUMENTS_BYTES)
    if problem:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"arguments: {problem}", details={"field": "arguments"})
    try:
        canonical_json(arguments)
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"arguments: {exc}", details={"field": "arguments"}) from None


# --- rules ----------------------------------------------------------------------------------------

RULE_FIELDS = tuple(f for f in ApprovalRule.FIELDS)


def _rule_clean(rule: ApprovalRule) -> None:
    rule.full_clean(exclude=["project"])
    if rule.webhook_url and not url_allowed(rule.webhook_url, rule.project.webhook_allowlist):
        raise ValidationError({"webhook_url": "is not on the project's webhook allowlist."})


@transaction.atomic
def rule_create(*, project: Project, actor, **fields) -> ApprovalRule:
    unknown = set(fields) - set(RULE_FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of an approval rule."})
    rule = ApprovalRule(project=project, **fields)
    _rule_clean(rule)
    rule.save()
    audit_change(actor, project, "approvals.rule_created", rule, after=rule.as_dict())
    return rule


@transaction.atomic
def rule_update(*, rule: ApprovalRule, actor, **changes) -> ApprovalRule:
    rule = ApprovalRule.objects.select_for_update().select_related("project").get(pk=rule.pk)
    return update_audited(rule, changes, RULE_FIELDS, lambda: _rule_clean(rule), actor, "approvals.rule_updated")


@transaction.atomic
def rule_delete(*, rule: ApprovalRule, actor) -> None:
    audit_change(actor, rule.project, "approvals.rule_deleted", rule, before=rule.as_dict())
    rule.delete()


@dataclass(frozen=True)
class Ask:
    """What an agent is about to do, as a rule sees it."""

    action: str
    tool: str = ""
    agent: str = ""
    end_user: str = ""
    estimated_cost_nanos: int | None = None
    risk: str = ""


def rule_matches(rule: ApprovalRule, ask: Ask) -> bool:
    if rule.action_pattern and not (fnmatchcase(ask.action, rule.action_pattern)
                                    or (ask.tool and fnmatchcase(ask.tool, rule.action_pattern))):
        return False
    if rule.agent_pattern and not fnmatchcase(ask.agent, rule.agent_pattern):
        return False
    if rule.end_user and ask.end_user != rule.end_user:
        return False
    # No estimate against a cost condition: the rule holds (an unknown cost may be any cost).
    if rule.min_cost_nanos is not None and ask.estimated_cost_nanos is not None \
            and ask.estimated_cost_nanos <= rule.min_cost_nanos:
        return False
    return not rule.risk_labels or ask.risk in rule.risk_labels


def rule_for(project_id: int, ask: Ask) -> ApprovalRule | None:
    """The first enabled rule of the project that holds ``ask`` (by position, then id), or None."""
    for rule in ApprovalRule.objects.filter(project_id=project_id, enabled=True).order_by("position", "id"):
        if rule_matches(rule, ask):
            return rule
    return None


# --- requests (agents) ----------------------------------------------------------------------------


def _new_public_id() -> str:
    return "apr_" + secrets.token_hex(12)


def _owner_of(key: ApiKey) -> str:
    """Who minted the key (a person's username), as decisions are compared with it; "" for the system."""
    return "" if key.created_by in ("", "system") or key.created_by.startswith("key ") else key.created_by


def _span(approval: Approval, what: str, *, now: datetime, status: str = "ok", extra: dict | None = None,
          message: str = "") -> dict:
    span = {"span_id": records.new_id(), "name": f"approval.{what}", "kind": "guardrail",
            "start_time": now.isoformat(), "end_time": now.isoformat(), "status": status,
            "component": "approvals", "action": approval.action,
            "attributes": {"controlplane.approval.id": approval.public_id,
                           "controlplane.approval.state": approval.state,
                           "controlplane.approval.action_hash": approval.action_hash,
                           "controlplane.approval.rule": approval.rule_name, **(extra or {})}}
    if approval.span_id:
        span["parent_span_id"] = approval.span_id
    if message:
        span["status_message"] = message
    return {"op": "span", "run_id": approval.run_id, "span": span}


def _trace(approval: Approval, key: ApiKey | None, recs: list[dict]) -> None:
    """Record on the run's trace, in the caller's transaction (nothing when the approval names no run)."""
    if not approval.run_id:
        return
    for i, rec in enumerate(recs):
        records.validate_record(rec, f"records[{i}]")
    traces.batch_accept(project=approval.project, api_key=key, source="approvals", response={}, records=recs,
                        item_count=len(recs))


@dataclass
class Requested:
    approval: Approval
    created: bool


def request_hash(body: dict) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


def approval_request(*, key: ApiKey, action: str, arguments, tool: str = "", summary: str = "", risk: str = "",
                     estimated_cost_nanos: int | None = None, agent: str = "", end_user: str = "",
                     run_id: str = "", span_id: str = "", callback_url: str = "",
                     idempotency_key: str | None = None, body_hash: str = "") -> Requested:
    """Ask for approval of ``action`` with ``arguments``. The first matching rule (else the defaults:
    approvers, quorum 1, no deadline) decides who may approve and how many. An ``idempotency_key``
    already used by this key answers the approval it created (409 idempotency_conflict for another body)."""
    validate_arguments(arguments)
    project = key.project
    if callback_url and not url_allowed(callback_url, project.webhook_allowlist):
        raise ApiError(ErrorCode.INVALID_REQUEST, "callback_url is not on the project's webhook allowlist.",
                       details={"field": "callback_url"})
    if idempotency_key:
        found = _idempotent(key, idempotency_key, body_hash)
        if found is not None:
            return Requested(found, created=False)
    rule = rule_for(project.pk, Ask(action=action, tool=tool, agent=agent, end_user=end_user,
                                    estimated_cost_nanos=estimated_cost_nanos, risk=risk))
    now = timezone.now()
    approval = Approval(
        project=project, public_id=_new_public_id(), api_key=key, rule=rule, rule_name=rule.name if rule else "",
        approver_role=rule.approver_role if rule else ApproverRole.APPROVER, quorum=rule.quorum if rule else 1,
        action=action, tool=tool, arguments=project.redactor().value(arguments),
        action_hash=action_hash(action, arguments), summary=summary, risk=risk,
        estimated_cost_nanos=estimated_cost_nanos, agent_name=agent, end_user=end_user, key_owner=_owner_of(key),
        run_id=run_id, span_id=span_id, callback_url=callback_url, idempotency_key=idempotency_key or None,
        request_hash=body_hash, created_at=now,
        expires_at=now + timedelta(seconds=rule.deadline_seconds) if rule and rule.deadline_seconds else None,
        overdue_at=now + timedelta(seconds=rule.overdue_seconds) if rule and rule.overdue_seconds else None)
    try:
        with transaction.atomic():
            approval.save()
            _name_approvers(approval, rule)
            _trace(approval, key, [_span(approval, "request", now=now, extra={
                "controlplane.approval.quorum": approval.quorum,
                "controlplane.approval.approver_role": approval.approver_role})])
            live.publish_changed(approval)
            _notify(approval, "approval.requested")
    except IntegrityError:
        if not idempotency_key:
            raise
        found = _idempotent(key, idempotency_key, body_hash)  # a concurrent twin won the unique key
        if found is None:
            raise
        return Requested(found, created=False)
    return Requested(approval, created=True)


def _idempotent(key: ApiKey, idempotency_key: str, body_hash: str) -> Approval | None:
    found = Approval.objects.select_related("project").filter(
        project_id=key.project_id, api_key=key, idempotency_key=idempotency_key).first()
    if found is not None and found.request_hash != body_hash:
        raise ApiError(ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used with another request.",
                       status_code=409, details={"approval_id": found.public_id})
    return found


def _name_approvers(approval: Approval, rule: ApprovalRule | None) -> None:
    """The rule's named approvers may decide this approval (guardian's per-object permission)."""
    if rule is None or not rule.named_approvers:
        return
    for user in get_user_model().objects.filter(username__in=rule.named_approvers, is_active=True):
        assign_perm("approvals.decide_approval", user, approval)


def _notify(approval: Approval, event: str) -> None:
    """After commit: the rule's emails (a request) and the webhooks (the rule's, the agent's callback)."""
    from .tasks import notify  # the task module imports this one

    if approval.callback_url or (approval.rule_id and (approval.rule.webhook_url or approval.rule.notify_emails)):
        transaction.on_commit(lambda: notify.delay(approval.pk, event), robust=True)


# --- decisions (people) ---------------------------------------------------------------------------


def decider_role(user, approval: Approval) -> str | None:
    """The role that lets ``user`` decide ``approval`` now (checked at the moment of the decision, with
    guardian's object permissions: one checker, so the project's permissions are read once), or None."""
    if not getattr(user, "is_active", False):
        return None
    checker = ObjectPermissionChecker(user)
    project = approval.project
    manages = checker.has_perm("projects.manage_project", project)
    if approval.approver_role == ApproverRole.ADMIN:
        allowed, role = manages, "admin"
    else:
        allowed, role = checker.has_perm("projects.approve_project", project), "admin" if manages else "approver"
    if allowed:
        return "superuser" if user.is_superuser else role
    if checker.has_perm("approvals.decide_approval", approval):
        return "named approver"
    return None


def _identities(approval: Approval) -> tuple[str, str]:
    return approval.end_user.strip().lower(), approval.key_owner.strip().lower()


def is_requester(user, approval: Approval) -> bool:
    end_user, owner = _identities(approval)
    names = {user.get_username().lower(), (user.email or "").lower()} - {""}
    return bool((end_user and end_user in names) or (owner and owner == user.get_username().lower()))


def _expired_now(approval: Approval, now: datetime) -> bool:
    return approval.expires_at is not None and approval.expires_at <= now


def _closed(approval: Approval) -> ApiError:
    approval.refresh_from_db(fields=["state", "approvals", "decided_at", "consumed_at"])
    if approval.state == State.EXPIRED:
        return ApiError(ErrorCode.APPROVAL_EXPIRED, "The approval has expired; it can never run.", status_code=409,
                        details={"state": approval.state})
    return ApiError(ErrorCode.APPROVAL_CLOSED, f"The approval is {approval.state}.", status_code=409,
                    details={"state": approval.state})


def decide(*, approval: Approval, user, outcome: str, reason: str = "") -> Approval:
    """Approve or reject, as ``user``. Refused (403) for a role that does not allow it now and for the
    requester's own request; 409 when it is no longer pending (decided, expired, cancelled) or this person
    already decided it. One conditional update decides; the audit event is in the same transaction."""
    if outcome not in Decision.Outcome.values:
        raise ApiError(ErrorCode.INVALID_REQUEST, "outcome must be approve or reject.", details={"field": "outcome"})
    role = decider_role(user, approval)
    if role is None:
        raise ApiError(ErrorCode.PERMISSION_DENIED, "Your role in this project does not allow deciding this "
                       "approval.", status_code=403, details={"approver_role": approval.approver_role})
    if is_requester(user, approval):
        raise ApiError(ErrorCode.SELF_APPROVAL, "The requester cannot decide their own request.", status_code=403)
    now = timezone.now()
    if approval.state == State.PENDING and _expired_now(approval, now):
        expire(approval=approval, now=now)
    end_user, owner = _identities(approval)
    try:
        with transaction.atomic():
            Decision.objects.create(
                project_id=approval.project_id, approval=approval, decider=user,
                decider_username=user.get_username().lower(), decider_email=(user.email or "").lower(),
                requester_end_user=end_user, requester_owner=owner, role=role, outcome=outcome, reason=reason,
                action_hash=approval.action_hash, created_at=now)
            still_open = Approval.objects.filter(pk=approval.pk, state=State.PENDING).filter(
                Q(expires_at__isnull=True) | Q(expires_at__gt=now))
            if outcome == Decision.Outcome.APPROVE:
                done = still_open.update(
                    approvals=F("approvals") + 1,
                    state=Case(When(approvals__gte=F("quorum") - 1, then=Value(State.APPROVED)),
                               default=Value(State.PENDING)),
                    decided_at=Case(When(approvals__gte=F("quorum") - 1, then=Value(now)), default=None))
            else:
                done = still_open.update(state=State.REJECTED, decided_at=now, closed_reason=reason[:500])
            if not done:
                raise _Lost
            approval.refresh_from_db(fields=["state", "approvals", "decided_at", "closed_reason"])
            audit_record(actor=actor_for(user, approval.project),
                         action="approvals.approved" if approval.state == State.APPROVED else
                         "approvals.rejected" if approval.state == State.REJECTED else "approvals.approval_counted",
                         object_type="approvals.approval", object_id=approval.pk, object_repr=str(approval),
                         project_id=approval.project_id, project_slug=approval.project.slug,
                         after={"outcome": outcome, "reason": reason, "role": role, "state": approval.state,
                                "approvals": approval.approvals, "quorum": approval.quorum,
                                "action": approval.action, "action_hash": approval.action_hash,
                                "approval_id": approval.public_id})
            _trace(approval, None, [_span(approval, "decision", now=now, extra={
                "controlplane.approval.outcome": outcome, "controlplane.approval.decider": user.get_username(),
                "controlplane.approval.role": role, "controlplane.approval.reason": reason[:500],
                "controlplane.approval.approvals": approval.approvals})])
            live.publish_changed(approval)
            if approval.state != State.PENDING:
                _notify(approval, f"approval.{approval.state}")
    except _Lost:
        raise _closed(approval) from None
    except IntegrityError as exc:
        if "approvals_one_decision_each" in str(exc) or Decision.objects.filter(
                approval=approval, decider_username=user.get_username().lower()).exists():
            raise ApiError(ErrorCode.ALREADY_DECIDED, "You have already decided this approval.",
                           status_code=409) from None
        if "approvals_not_the" in str(exc):
            raise ApiError(ErrorCode.SELF_APPROVAL, "The requester cannot decide their own request.",
                           status_code=403) from None
        raise
    return approval


class _Lost(Exception):
    """The conditional update found the approval no longer pending: undo the decision's row."""


# --- consume, cancel, expire (agents, the beat) ---------------------------------------------------


@dataclass(frozen=True)
class Grant:
    token: str
    expires_at: datetime


def consume(*, approval: Approval, key: ApiKey, action: str, arguments) -> tuple[Approval, Grant]:
    """Take an approved action once, for exactly the arguments that were approved: the hash is computed
    here from what is sent. A second consume, other arguments, or an approval that is not approved (or
    past its deadline) is refused and changes nothing. Answers with a short-lived signed grant."""
    validate_arguments(arguments)
    presented = action_hash(action, arguments)
    now = timezone.now()
    if approval.state == State.APPROVED and _expired_now(approval, now):
        expire(approval=approval, now=now)
    with transaction.atomic():
        done = Approval.objects.filter(pk=approval.pk, state=State.APPROVED, action_hash=presented).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)).update(state=State.CONSUMED, consumed_at=now)
        if not done:
            approval.refresh_from_db(fields=["state", "consumed_at"])
            if approval.state == State.APPROVED and approval.action_hash != presented:
                refused = ApiError(ErrorCode.ACTION_MISMATCH, "These are not the action and arguments that were "
                                   "approved.", status_code=409, details={"presented_hash": presented})
                mismatch = True
            else:
                refused = _closed(approval)
                mismatch = False
        else:
            approval.state, approval.consumed_at = State.CONSUMED, now
            refused, mismatch = None, False
        if refused is None or mismatch:
            extra = {"controlplane.approval.presented_hash": presented}
            _trace(approval, key, [_span(approval, "consume", now=now, status="ok" if refused is None else "error",
                                         extra=extra, message="" if refused is None else refused.error_code)])
        if refused is None:
            live.publish_changed(approval)
    if refused is not None:
        raise refused
    ttl = settings.APPROVALS_GRANT_SECONDS
    issued = int(time.time())
    token = grants.issue(secret=approval.project.webhook_secret, approval_id=approval.public_id,
                         project=approval.project.slug, action_hash=approval.action_hash, issued_at=issued,
                         ttl_seconds=ttl)
    return approval, Grant(token=token, expires_at=datetime.fromtimestamp(issued + ttl, tz=UTC))


@transaction.atomic
def cancel(*, approval: Approval, key: ApiKey, reason: str = "") -> Approval:
    """The agent no longer needs it (pending or approved, not yet consumed): it will never run."""
    now = timezone.now()
    done = Approval.objects.filter(pk=approval.pk, state__in=[State.PENDING, State.APPROVED]).update(
        state=State.CANCELLED, closed_reason=reason[:500], decided_at=Case(
            When(decided_at__isnull=True, then=Value(now)), default=F("decided_at")))
    if not done:
        raise _closed(approval)
    approval.refresh_from_db()
    _trace(approval, key, [_span(approval, "cancel", now=now)])
    live.publish_changed(approval)
    return approval


def expire(*, approval: Approval, now: datetime | None = None) -> bool:
    """Past its deadline a pending (or approved, not consumed) approval is expired: it never runs."""
    now = now or timezone.now()
    with transaction.atomic():
        done = Approval.objects.filter(pk=approval.pk, state__in=[State.PENDING, State.APPROVED],
                                       expires_at__lte=now).update(state=State.EXPIRED)
        if done:
            approval.state = State.EXPIRED
            _trace(approval, None, [_span(approval, "expired", now=now, status="error", message="expired")])
            live.publish_changed(approval, State.EXPIRED)
            _notify(approval, "approval.expired")
    return bool(done)


def expire_due(*, now: datetime | None = None, limit: int = 500) -> int:
    """The beat: expire every approval past its deadline (a batch at a time); how many it expired."""
    now = now or timezone.now()
    due = Approval.objects.select_related("project", "rule").filter(
        state__in=[State.PENDING, State.APPROVED], expires_at__lte=now).order_by("expires_at")[:limit]
    return sum(expire(approval=a, now=now) for a in due)
