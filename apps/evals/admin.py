"""The evals in the admin: configurations and jobs edited by project admins through the audited services;
scores, the after-run outbox and the batches read-only for every role of their project. (Beat's own
schedule, django-celery-beat's admin, is for superusers; a job's cron is edited on the job.)"""
from __future__ import annotations

from django.contrib import admin

from apps.projects.admin import EditedByProjectAdmins, ReadOnlyForRoles, VisibleProjectFilter

from . import jobs, services
from .models import EvalConfig, EvalJob, EvalJobRun, EvalPending, EvalScore


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


@admin.register(EvalJob)
class EvalJobAdmin(EditedByProjectAdmins):
    list_display = ("name", "project", "agent_pattern", "schedule", "window_hours", "sample_size", "enabled",
                    "updated_at")
    list_filter = (VisibleProjectFilter, "enabled")
    search_fields = ("name", "agent_pattern")
    list_select_related = ("project",)
    fields = ("project", *EvalJob.FIELDS)

    service_fields = EvalJob.FIELDS

    def service_create(self, *, project, actor, values):
        return jobs.job_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        jobs.job_update(job=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        jobs.job_delete(job=obj, actor=actor)


@admin.register(EvalJobRun)
class EvalJobRunAdmin(ReadOnlyForRoles):
    list_display = ("job", "state", "trigger", "window_start", "window_end", "total", "scanned", "evaluated",
                    "scores_added", "errors", "created_at", "finished_at")
    list_filter = (VisibleProjectFilter, "state", "trigger")
    list_select_related = ("job",)
    raw_id_fields = ("job", "started_by")
