from django.contrib import admin

from .models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only audit console: nobody adds, edits or deletes rows here (nor can the database)."""

    list_display = ("seq", "created_at", "project_slug", "actor_repr", "actor_role", "action", "object_repr")
    list_filter = ("action", "actor_type", "object_type", "project_slug")
    search_fields = ("actor_repr", "object_repr", "object_id", "action", "request_id")
    date_hierarchy = "created_at"
    ordering = ("-seq",)
    show_full_result_count = False
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        from django.apps import apps  # audit sits at the bottom: find projects without importing it

        visible = apps.get_model("projects", "Project").objects.visible_to(request.user)
        return qs.filter(project_id__in=visible.values("pk"))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
