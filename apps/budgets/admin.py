"""Costs in the admin: price overrides, cost settings and budgets edited by project admins (through
the audited services); the priced spans, day rollups, spikes, ledgers, reservations and alerts
read-only for every role."""
from __future__ import annotations

from django import forms
from django.contrib import admin

from apps.projects.admin import EditedByProjectAdmins, ReadOnlyForRoles, VisibleProjectFilter

from . import services
from .models import (
    Budget,
    BudgetAlert,
    BudgetLedger,
    CostDay,
    CostSettings,
    CostSpike,
    PriceOverride,
    Reservation,
    SpanCost,
    nanos,
)


@admin.register(PriceOverride)
class PriceOverrideAdmin(EditedByProjectAdmins):
    list_display = ("project", "provider", "model_pattern", "effective_from", "input_per_mtok", "output_per_mtok",
                    "cache_read_per_mtok", "cache_write_per_mtok", "reasoning_per_mtok", "note")
    list_filter = (VisibleProjectFilter, "provider")
    search_fields = ("model_pattern", "provider", "note")
    list_select_related = ("project",)
    fields = ("project", "provider", "model_pattern", "effective_from", "input_per_mtok", "output_per_mtok",
              "cache_read_per_mtok", "cache_write_per_mtok", "reasoning_per_mtok", "note")

    service_fields = services.OVERRIDE_FIELDS

    def service_create(self, *, project, actor, values):
        return services.price_override_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.price_override_update(override=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.price_override_delete(override=obj, actor=actor)



@admin.register(CostSettings)
class CostSettingsAdmin(EditedByProjectAdmins):
    list_display = ("project", "spike_factor", "spike_baseline_days", "spike_min_usd", "disagreement_margin",
                    "webhook_url")
    list_select_related = ("project",)
    fields = ("project", *CostSettings.FIELDS)

    def save_model(self, request, obj, form, change):
        self._check(request, obj)
        created = services.cost_settings_update(project=form.cleaned_data["project"], actor=request.user,
                                                **{f: form.cleaned_data[f] for f in CostSettings.FIELDS})
        obj.pk = created.pk

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(SpanCost)
class SpanCostAdmin(ReadOnlyForRoles):
    list_display = ("day", "project", "run", "span_id", "model", "provider", "source", "cost_usd", "disagreement",
                    "price_ref")
    list_filter = (VisibleProjectFilter, "source", "disagreement")
    search_fields = ("model", "span_id", "end_user", "agent_name")
    list_select_related = ("project", "run")


@admin.register(CostDay)
class CostDayAdmin(ReadOnlyForRoles):
    list_display = ("day", "project", "agent_name", "agent_version", "model", "provider", "cost_usd", "calls",
                    "unpriced_calls")
    list_filter = (VisibleProjectFilter,)
    search_fields = ("agent_name", "model")
    list_select_related = ("project",)
    ordering = ("-day", "-cost_nanos")


@admin.register(CostSpike)
class CostSpikeAdmin(ReadOnlyForRoles):
    list_display = ("detected_at", "project", "period", "day", "hour", "scope", "value", "spend_usd",
                    "baseline_usd", "factor", "webhook_status", "email_status")
    list_filter = (VisibleProjectFilter, "period", "scope")
    list_select_related = ("project",)


class BudgetForm(forms.ModelForm):
    cap_usd = forms.DecimalField(max_digits=18, decimal_places=9, min_value=0, help_text="USD per period.")

    class Meta:
        model = Budget
        fields = ("project", "name", "scope", "value", "period", "time_zone", "hard", "thresholds", "enabled")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["cap_usd"].initial = self.instance.cap_usd


@admin.register(Budget)
class BudgetAdmin(EditedByProjectAdmins):
    form = BudgetForm
    list_display = ("name", "project", "scope", "value", "period", "cap_usd", "hard", "thresholds", "enabled")
    list_filter = (VisibleProjectFilter, "scope", "period", "hard", "enabled")
    search_fields = ("name", "value")
    list_select_related = ("project",)
    fields = ("project", "name", "scope", "value", "period", "cap_usd", "time_zone", "hard", "thresholds", "enabled")

    service_fields = Budget.FIELDS

    def service_values(self, form):
        return {**super().service_values(form), "cap_nanos": nanos(form.cleaned_data["cap_usd"])}

    def service_create(self, *, project, actor, values):
        return services.budget_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.budget_update(budget=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.budget_delete(budget=obj, actor=actor)



@admin.register(BudgetLedger)
class BudgetLedgerAdmin(ReadOnlyForRoles):
    list_display = ("period_start", "project", "budget", "cap_nanos", "charged_nanos", "traced_nanos", "held_nanos",
                    "reservations")
    list_filter = (VisibleProjectFilter,)
    list_select_related = ("project", "budget")


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyForRoles):
    list_display = ("created_at", "project", "state", "agent_name", "end_user", "model", "run_id", "estimate_nanos",
                    "charged_nanos", "refused_by")
    list_filter = (VisibleProjectFilter, "state")
    search_fields = ("run_id", "agent_name", "end_user", "model")
    list_select_related = ("project", "refused_by")


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyForRoles):
    list_display = ("created_at", "project", "budget", "period_start", "threshold", "spent_nanos", "cap_nanos",
                    "webhook_status", "email_status")
    list_filter = (VisibleProjectFilter,)
    list_select_related = ("project", "budget")
