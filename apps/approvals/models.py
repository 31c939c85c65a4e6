"""Approvals: a rule says which actions need a person's yes; an approval is one such request.

The server holds the truth: an approval's state lives here only, changes by conditional updates
(``WHERE state = 'pending'``), and nothing turns into ``approved`` but a decision by a person whose
role allows it (a timeout, a fault or a restart leaves it pending; past its deadline it is
``expired``, which never runs). The action hash (SHA-256 over the canonical JSON of the action's name
and arguments) is computed here, never taken from a client.

``Decision`` rows count the quorum (one per approver and approval) and, by a database constraint,
never belong to the requester: the end user the run is for or the person who owns the key.
"""
from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

from apps.projects.models import ProjectOwnedQuerySet
from apps.traces.models import NANOS_PER_USD

MAX_ARGUMENTS_BYTES = 64 * 1024
MAX_QUORUM = 10


def usd(nanos: int | None) -> Decimal | None:
    return None if nanos is None else Decimal(nanos).scaleb(-9)


def nanos(amount: Decimal) -> int:
    return int((amount * NANOS_PER_USD).to_integral_value())


class ApproverRole(models.TextChoices):
    """Who may decide what a rule holds: people holding the approver role or admin (``approve_project``),
    or admins only. A rule's named approvers may decide too (guardian's ``decide_approval`` on the
    approval), whatever their role in the project."""

    APPROVER = "approver", "Approvers and admins"
    ADMIN = "admin", "Admins only"


class ApprovalRule(models.Model):
    """Which actions of a project need approval. Every condition set must hold (an empty one holds for
    all); the first enabled rule that matches, by ``position`` then id, decides who may approve."""

    FIELDS = ("name", "position", "enabled", "action_pattern", "agent_pattern", "end_user", "min_cost_nanos",
              "risk_labels", "approver_role", "named_approvers", "quorum", "deadline_seconds",
              "overdue_seconds", "notify_emails", "webhook_url")

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="approval_rules")
    name = models.CharField(max_length=100)
    position = models.PositiveIntegerField(default=100, help_text="Rules are tried in this order (then by id).")
    enabled = models.BooleanField(default=True)
    action_pattern = models.CharField(
        max_length=200, blank=True, help_text="Glob on the action's name or its tool's name (payments.*, "
                                              "send_email); empty: any action.")
    agent_pattern = models.CharField(max_length=200, blank=True, help_text="Glob on the agent; empty: any.")
    end_user = models.CharField(max_length=256, blank=True, help_text="Exactly this end user; empty: any.")
    min_cost_nanos = models.BigIntegerField(
        null=True, blank=True, validators=[MinValueValidator(0)],
        help_text="Only actions whose estimated cost is above this (nano-USD); empty: whatever the cost. An "
                  "action that sends no estimate matches a rule with a cost condition (fails closed).")
    risk_labels = models.JSONField(default=list, blank=True,
                                   help_text='Only actions the agent labels with one of these (["high"]); '
                                             "empty: any.")
    approver_role = models.CharField(max_length=16, choices=ApproverRole.choices, default=ApproverRole.APPROVER)
    named_approvers = models.JSONField(default=list, blank=True,
                                       help_text="Usernames who may decide this rule's approvals too.")
    quorum = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(MAX_QUORUM)],
        help_text="Distinct approvers needed.")
    deadline_seconds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="Past this after the request, a pending approval is expired (never runs); empty: no deadline.")
    overdue_seconds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="Pending longer than this: highlighted, and notified again (emails, webhook).")
    notify_emails = models.JSONField(default=list, blank=True, help_text="Emailed when a request arrives.")
    webhook_url = models.CharField(max_length=500, blank=True,
                                   help_text="Sent requests and decisions, signed (on the project's allowlist).")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["position", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(quorum__gte=1) & Q(quorum__lte=MAX_QUORUM),
                                   name="approvals_rule_quorum"),
        ]

    def __str__(self) -> str:
        return f"rule {self.name}"

    @property
    def min_cost_usd(self) -> Decimal | None:
        return usd(self.min_cost_nanos)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def clean(self) -> None:
        for field in ("risk_labels", "named_approvers", "notify_emails"):
            value = getattr(self, field)
            if not isinstance(value, list) or len(value) > 50 or not all(
                    isinstance(v, str) and 0 < len(v) <= 256 for v in value):
                raise ValidationError({field: "A list of at most 50 non-empty strings."})


class Approval(models.Model):
    """One request for a person's yes. ``action_hash`` is what the decision is about and what a consume
    must present again; ``arguments`` are kept redacted (the project's redaction), for people to read."""

    class State(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"
        EXPIRED = "expired"
        CANCELLED = "cancelled"
        CONSUMED = "consumed"

    TERMINAL = (State.REJECTED, State.EXPIRED, State.CANCELLED, State.CONSUMED)

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    public_id = models.CharField(max_length=40, unique=True)
    api_key = models.ForeignKey("projects.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="+")
    rule = models.ForeignKey(ApprovalRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    rule_name = models.CharField(max_length=100, blank=True)
    approver_role = models.CharField(max_length=16, choices=ApproverRole.choices)
    quorum = models.PositiveSmallIntegerField(default=1)
    action = models.CharField(max_length=200)
    tool = models.CharField(max_length=200, blank=True)
    arguments = models.JSONField(default=dict, blank=True, help_text="Redacted.")
    action_hash = models.CharField(max_length=64)
    summary = models.TextField(blank=True)
    risk = models.CharField(max_length=64, blank=True)
    estimated_cost_nanos = models.BigIntegerField(null=True, blank=True)
    agent_name = models.CharField(max_length=200, blank=True)
    end_user = models.CharField(max_length=256, blank=True)
    key_owner = models.CharField(max_length=200, blank=True, help_text="Who minted the requesting key.")
    run_id = models.CharField(max_length=128, blank=True)
    span_id = models.CharField(max_length=128, blank=True)
    callback_url = models.CharField(max_length=500, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001 - NULL = no key (unique)
    request_hash = models.CharField(max_length=64, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    approvals = models.PositiveSmallIntegerField(default=0, help_text="Distinct approvers so far.")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)
    overdue_at = models.DateTimeField(null=True, blank=True)
    renotified_at = models.DateTimeField(null=True, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    consumed_at = models.DateTimeField(null=True, blank=True)
    closed_reason = models.CharField(max_length=500, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "api_key", "idempotency_key"], name="approvals_idempotency",
                                    condition=Q(idempotency_key__isnull=False)),
            models.CheckConstraint(condition=Q(state__in=["pending", "approved", "rejected", "expired", "cancelled",
                                                          "consumed"]), name="approvals_state"),
            models.CheckConstraint(condition=Q(approvals__lte=F("quorum")), name="approvals_within_quorum"),
        ]
        indexes = [
            models.Index(fields=["project", "state", "-created_at"], name="approvals_by_state"),
            models.Index(fields=["expires_at"], name="approvals_due", condition=Q(state__in=["pending", "approved"])),
            models.Index(fields=["project", "run_id"], name="approvals_run"),
        ]
        permissions = [("decide_approval", "Decide this approval (a named approver)")]

    def __str__(self) -> str:
        return f"approval {self.public_id} {self.action} ({self.state})"

    @property
    def estimated_cost_usd(self) -> Decimal | None:
        return usd(self.estimated_cost_nanos)

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL


class Decision(models.Model):
    """One person's approve or reject of one approval, with the role that allowed it then. Never the
    requester's own (the constraints compare the decider with the identities copied from the approval)."""

    class Outcome(models.TextChoices):
        APPROVE = "approve"
        REJECT = "reject"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    approval = models.ForeignKey(Approval, on_delete=models.CASCADE, related_name="decisions")
    decider = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    decider_username = models.CharField(max_length=150)  # lower case, as the constraints compare it
    decider_email = models.CharField(max_length=254, blank=True)  # lower case
    requester_end_user = models.CharField(max_length=256, blank=True)  # lower case
    requester_owner = models.CharField(max_length=200, blank=True)  # lower case
    role = models.CharField(max_length=32)
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    reason = models.TextField(blank=True)
    action_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField()

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["approval", "decider_username"], name="approvals_one_decision_each"),
            models.CheckConstraint(
                condition=Q(requester_end_user="") | (~Q(decider_username=F("requester_end_user"))
                                                      & ~Q(decider_email=F("requester_end_user"))),
                name="approvals_not_the_end_users_own"),
            models.CheckConstraint(
                condition=Q(requester_owner="") | ~Q(decider_username=F("requester_owner")),
                name="approvals_not_the_key_owners_own"),
        ]

    def __str__(self) -> str:
        return f"{self.outcome} by {self.decider_username}"
