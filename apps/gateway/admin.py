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

    def save_model(self, request, obj, form, change):
        self._check(request, obj)
        values = {f: form.cleaned_data[f] for f in Upstream.FIELDS if f in form.cleaned_data}
        if change:
            services.upstream_update(upstream=obj, actor=request.user, **values)
        else:
            obj.pk = services.upstream_create(project=form.cleaned_data["project"], actor=request.user, **values).pk

    def delete_model(self, request, obj):
        self._check(request, obj)
        services.upstream_delete(upstream=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)
