from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from . import services
from .models import ApiKey, Project, ProjectRole


class ScopedAdminMixin:
    """Staff who are not superusers see only rows of the projects they hold a role in."""

    project_field = "project"

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        visible = Project.objects.visible_to(request.user).values("pk")
        return qs.filter(**{f"{self.project_field}__in": visible})


class VisibleProjectFilter(admin.SimpleListFilter):
    """Filter by project, offering only the projects the viewer may see (the stock related-field
    filter would list every project's name)."""

    title = "project"
    parameter_name = "project"

    def __init__(self, request, params, model, model_admin):
        self.project_field = getattr(model_admin, "project_field", "project")
        super().__init__(request, params, model, model_admin)

    def lookups(self, request, model_admin):
        return [(str(p.pk), p.slug) for p in Project.objects.visible_to(request.user).order_by("slug")]

    def queryset(self, request, queryset):
        if self.value():
            if not (self.value().isascii() and self.value().isdigit()):
                return queryset.none()
            return queryset.filter(**{f"{self.project_field}_id": int(self.value())})
        return queryset


class ProjectRoleInline(admin.TabularInline):
    model = ProjectRole
    fields = ("role", "group")
    readonly_fields = ("role", "group")
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Project)
class ProjectAdmin(ScopedAdminMixin, admin.ModelAdmin):
    project_field = "pk"
    list_display = ("slug", "name", "created_at")
    search_fields = ("slug", "name")
    inlines = [ProjectRoleInline]

    def get_readonly_fields(self, request, obj=None):
        return ("slug", "created_at") if obj else ("created_at",)

    def save_model(self, request, obj, form, change):
        if change:
            services.project_update(project=obj, actor=request.user,
                                    **{f: form.cleaned_data[f] for f in services.PROJECT_SETTINGS
                                       if f in form.cleaned_data})
            return
        created = services.project_create(slug=obj.slug, name=obj.name, actor=request.user)
        obj.pk, obj.created_at = created.pk, created.created_at


class ApiKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.active()
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(ScopedAdminMixin, admin.ModelAdmin):
    list_display = ("name", "project", "display_prefix", "scopes", "created_at", "last_used_at", "expires_at",
                    "revoked_at")
    list_filter = (ApiKeyStatusFilter, VisibleProjectFilter)
    list_select_related = ("project",)
    search_fields = ("name", "lookup")
    actions = ["revoke_keys"]
    fields = ("project", "name", "scopes", "expires_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("project", "name", "scopes", "expires_at", "display_prefix", "created_by", "created_at",
                "last_used_at", "revoked_at")

    def get_fields(self, request, obj=None):
        if obj is None:
            return self.fields
        return self.get_readonly_fields(request, obj)

    def save_model(self, request, obj, form, change):
        if change:
            return  # keys are immutable; revoke and create a new one instead
        try:
            key, raw = services.api_key_create(project=obj.project, name=obj.name, scopes=obj.scopes or [],
                                               expires_at=obj.expires_at, actor=request.user)
        except ValidationError as exc:
            self.message_user(request, f"Key not created: {exc}", level=messages.ERROR)
            raise
        obj.pk = key.pk
        self.message_user(request, f"API key created. Copy it now, it is shown only once: {raw}",
                          level=messages.WARNING)

    def has_change_permission(self, request, obj=None):
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: the row stays for the audit trail

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request, queryset):
        for key in queryset.filter(revoked_at__isnull=True):
            services.api_key_revoke(key=key, actor=request.user)
        self.message_user(request, "Selected keys revoked.")
