"""The gateway's upstreams in the admin: visible to every role of their project, added, changed and
deleted by its admins, through the audited services."""
from __future__ import annotations

from django.contrib import admin

from apps.projects.admin import EditedByProjectAdmins, VisibleProjectFilter

from . import services
from .models import Upstream


@admin.register(Upstream)
class UpstreamAdmin(EditedByProjectAdmins):
    list_display = ("name", "project", "base_url", "provider", "model_names", "priority", "timeout_seconds",
                    "enabled")
    list_filter = (VisibleProjectFilter, "enabled")
    search_fields = ("name", "base_url")
    list_select_related = ("project",)
    fields = ("project", *Upstream.FIELDS)

    service_fields = Upstream.FIELDS

    def service_create(self, *, project, actor, values):
        return services.upstream_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.upstream_update(upstream=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.upstream_delete(upstream=obj, actor=actor)
