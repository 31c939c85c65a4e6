"""The audit console: read-only, nobody adds, edits or deletes rows here (nor can the database).

Registered by ``apps.projects.admin`` with the project scoping (``ScopedAdminMixin``): which projects
a viewer may see is the projects app's to say, and this app imports nothing above it.
"""
from django.contrib import admin

from .models import AuditEvent


class AuditEventAdmin(admin.ModelAdmin):
    """Read-only audit console; not registered here (see the module's docstring)."""

    list_display = ("seq", "created_at", "project_slug", "actor_repr", "actor_role", "action", "object_repr")
    list_filter = ("action", "actor_type", "object_type", "project_slug")
    search_fields = ("actor_repr", "object_repr", "object_id", "action", "request_id")
    date_hierarchy = "created_at"
    ordering = ("-seq",)
    show_full_result_count = False
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
