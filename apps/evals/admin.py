"""The evals in the admin: configurations edited by project admins through the audited services;
scores and the after-run outbox read-only for every role of their project."""
from __future__ import annotations

from django.contrib import admin

from apps.projects.admin import EditedByProjectAdmins, ReadOnlyForRoles, VisibleProjectFilter

from . import services
from .models import EvalConfig, EvalPending, EvalScore


@admin.register(EvalConfig)
class EvalConfigAdmin(EditedByProjectAdmins):
    list_display = ("name", "project", "agent_pattern", "sample_rate", "enabled", "updated_at")
    list_filter = (VisibleProjectFilter, "enabled")
    search_fields = ("name", "agent_pattern")
    list_select_related = ("project",)
    fields = ("project", *EvalConfig.FIELDS)

    service_fields = EvalConfig.FIELDS

    def service_create(self, *, project, actor, values):
        return services.config_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.config_update(config=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.config_delete(config=obj, actor=actor)



@admin.register(EvalScore)
class EvalScoreAdmin(ReadOnlyForRoles):
    list_display = ("evaluator", "version", "run", "span_id", "score", "label", "passed", "outcome", "source",
                    "created_at")
    list_filter = (VisibleProjectFilter, "outcome", "source", "evaluator")
    search_fields = ("evaluator", "label", "run__run_id")
    list_select_related = ("run",)
    raw_id_fields = ("run", "config", "api_key", "user")


@admin.register(EvalPending)
class EvalPendingAdmin(ReadOnlyForRoles):
    list_display = ("run", "config", "state", "attempts", "due_at", "done_at", "last_error")
    list_filter = (VisibleProjectFilter, "state")
    list_select_related = ("run", "config")
    raw_id_fields = ("run", "config")
