"""The approvals API's inputs and outputs (the outputs for the schema: ``selectors.approval_json`` writes them)."""
from __future__ import annotations

from decimal import Decimal

from django.core.validators import RegexValidator
from rest_framework import serializers

from .models import Approval, ApprovalRule, Decision, nanos

_NO_NUL = RegexValidator(r"^[^\x00]*$", "must not contain NUL.")
_USD = {"max_digits": 18, "decimal_places": 9, "min_value": Decimal(0), "max_value": Decimal(10**9)}


def _text(max_length: int, **kw):
    return serializers.CharField(max_length=max_length, required=False, default="", allow_blank=True,
                                 validators=[_NO_NUL], **kw)


class RuleSerializer(serializers.ModelSerializer):
    min_cost_usd = serializers.DecimalField(**_USD, required=False, allow_null=True,
                                            help_text="Only actions whose estimated cost is above this (USD).")
    risk_labels = serializers.ListField(child=serializers.CharField(max_length=64), max_length=50, required=False)
    named_approvers = serializers.ListField(child=serializers.CharField(max_length=150), max_length=50,
                                            required=False)
    notify_emails = serializers.ListField(child=serializers.EmailField(), max_length=50, required=False)

    class Meta:
        model = ApprovalRule
        fields = ["id", "name", "position", "enabled", "action_pattern", "agent_pattern", "end_user", "min_cost_usd",
                  "risk_labels", "approver_role", "named_approvers", "quorum", "deadline_seconds", "overdue_seconds",
                  "notify_emails", "webhook_url", "created_at"]
        read_only_fields = ["id", "created_at"]

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["min_cost_usd"] = None if instance.min_cost_nanos is None else f"{instance.min_cost_usd:.9f}"
        return data

    def to_internal_value(self, data):
        values = super().to_internal_value(data)
        if "min_cost_usd" in values:
            amount = values.pop("min_cost_usd")
            values["min_cost_nanos"] = None if amount is None else nanos(amount)
        return values


class AskIn(serializers.Serializer):
    """What the agent is about to do (``check`` and a request share it)."""

    action = serializers.CharField(max_length=200, validators=[_NO_NUL], help_text="The action's name (send_email).")
    tool = _text(200, help_text="The tool that would run it, if any (a rule's pattern matches either name).")
    agent = _text(200)
    end_user = _text(256, help_text="Who the run is for: never allowed to approve it.")
    estimated_cost_usd = serializers.DecimalField(**_USD, required=False, allow_null=True)
    risk = _text(64, help_text="A risk label the agent chooses (rules may match on it).")


class ApprovalIn(AskIn):
    arguments = serializers.JSONField(help_text="The action's arguments (any JSON): hashed with the action's name; "
                                                "the consume must send the same.")
    summary = _text(2000, help_text="For the approver: what will happen, in words.")
    run_id = _text(128, help_text="The run it belongs to: the request, the decision and the consume are recorded "
                                  "on its trace.")
    span_id = _text(128, help_text="The span it belongs to (the records' parent).")
    callback_url = _text(500, help_text="Told of the decision by a signed webhook (on the project's allowlist).")


class CheckOut(serializers.Serializer):
    required = serializers.BooleanField(help_text="Whether an approval is needed before the action runs.")
    rule = RuleSerializer(allow_null=True)


class DecideIn(serializers.Serializer):
    reason = _text(2000)


class ConsumeIn(serializers.Serializer):
    action = serializers.CharField(max_length=200, validators=[_NO_NUL])
    arguments = serializers.JSONField(help_text="The arguments that will actually run.")


class CancelIn(serializers.Serializer):
    reason = _text(500)


class DecisionOut(serializers.Serializer):
    decider = serializers.CharField()
    role = serializers.CharField(help_text="The role that allowed the decision when it was made.")
    outcome = serializers.ChoiceField(choices=Decision.Outcome.choices)
    reason = serializers.CharField()
    at = serializers.DateTimeField()


class ApprovalOut(serializers.Serializer):
    id = serializers.CharField()
    project = serializers.CharField()
    state = serializers.ChoiceField(
        choices=Approval.State.choices,
        help_text="pending -> approved -> consumed; or rejected, expired (past its deadline: never runs), "
                  "cancelled (by the agent). Nothing becomes approved but by a decision.")
    action = serializers.CharField()
    tool = serializers.CharField()
    arguments = serializers.JSONField(help_text="Redacted by the project's redaction.")
    action_hash = serializers.CharField(help_text="SHA-256 over canonical JSON of {action, arguments}.")
    summary = serializers.CharField()
    risk = serializers.CharField()
    estimated_cost_usd = serializers.CharField(allow_null=True)
    agent = serializers.CharField()
    end_user = serializers.CharField()
    run_id = serializers.CharField()
    span_id = serializers.CharField()
    rule = serializers.CharField(allow_null=True)
    approver_role = serializers.CharField()
    quorum = serializers.IntegerField()
    approvals = serializers.IntegerField(help_text="Distinct approvers so far.")
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    decided_at = serializers.DateTimeField(allow_null=True)
    consumed_at = serializers.DateTimeField(allow_null=True)
    reason = serializers.CharField()
    decisions = DecisionOut(many=True, required=False)


class ConsumeOut(serializers.Serializer):
    approval = ApprovalOut()
    grant = serializers.CharField(help_text="cpg1.<payload>.<mac>: HMAC-SHA256 with the project's webhook secret.")
    grant_expires_at = serializers.DateTimeField()


class ListQuery(serializers.Serializer):
    project = serializers.RegexField(r"^[a-z0-9][a-z0-9-]{0,62}$", required=False)
    state = serializers.ChoiceField(choices=Approval.State.choices, required=False)
    run_id = serializers.CharField(max_length=128, required=False)
    before = serializers.IntegerField(min_value=1, required=False)
    limit = serializers.IntegerField(min_value=1, max_value=200, required=False, default=50)


class WaitQuery(serializers.Serializer):
    wait = serializers.IntegerField(min_value=0, max_value=30, required=False, default=0,
                                    help_text="Seconds to wait for a decision (at most 30): answered as soon as the "
                                              "approval is no longer pending, else when the wait ends (still "
                                              "pending; ask again on the same id).")
