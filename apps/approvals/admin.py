"""Approvals in the admin: rules edited by project admins (through the audited services); approvals and
decisions read-only for every role (people decide on the inbox page or over the API, where the role is
checked at the moment of the decision)."""
from __future__ import annotations

from django import forms
from django.contrib import admin

from apps.projects.admin import EditedByProjectAdmins, ReadOnlyForRoles, VisibleProjectFilter

from . import services
from .models import Approval, ApprovalRule, Decision, nanos


class RuleForm(forms.ModelForm):
    min_cost_usd = forms.DecimalField(max_digits=18, decimal_places=9, min_value=0, required=False,
                                      help_text="Only actions whose estimated cost is above this (USD); empty: any.")

    class Meta:
        model = ApprovalRule
        fields = [f for f in ApprovalRule.FIELDS if f != "min_cost_nanos"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["min_cost_usd"].initial = self.instance.min_cost_usd


@admin.register(ApprovalRule)
class ApprovalRuleAdmin(EditedByProjectAdmins):
    form = RuleForm
    list_display = ("name", "project", "position", "enabled", "action_pattern", "agent_pattern", "approver_role",
                    "quorum", "deadline_seconds")
    list_filter = (VisibleProjectFilter, "enabled", "approver_role")
    search_fields = ("name", "action_pattern", "agent_pattern")
    list_select_related = ("project",)
    fields = ("project", "name", "position", "enabled", "action_pattern", "agent_pattern", "end_user", "min_cost_usd",
              "risk_labels", "approver_role", "named_approvers", "quorum", "deadline_seconds", "overdue_seconds",
              "notify_emails", "webhook_url")

    service_fields = ApprovalRule.FIELDS

    def service_values(self, form):
        values = super().service_values(form)
        amount = form.cleaned_data.get("min_cost_usd")
        values["min_cost_nanos"] = None if amount is None else nanos(amount)
        return values

    def service_create(self, *, project, actor, values):
        return services.rule_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.rule_update(rule=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.rule_delete(rule=obj, actor=actor)



@admin.register(Approval)
class ApprovalAdmin(ReadOnlyForRoles):
    list_display = ("created_at", "public_id", "project", "state", "action", "agent_name", "end_user", "run_id",
                    "approvals", "quorum", "expires_at")
    list_filter = (VisibleProjectFilter, "state")
    search_fields = ("public_id", "action", "tool", "run_id", "agent_name", "end_user")
    list_select_related = ("project",)


@admin.register(Decision)
class DecisionAdmin(ReadOnlyForRoles):
    list_display = ("created_at", "project", "approval", "decider_username", "role", "outcome", "reason")
    list_filter = (VisibleProjectFilter, "outcome")
    search_fields = ("decider_username", "reason")
    list_select_related = ("project", "approval")
