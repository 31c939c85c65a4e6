"""The admin of projects and keys, the admin mixin every project-owned admin uses, and the
audit console (registered here: the audit app sits below projects and cannot scope by itself)."""
from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from guardian.core import ObjectPermissionChecker

from apps.audit.admin import AuditEventAdmin
from apps.audit.models import AuditEvent

from . import services
from .access import ProjectAccess, request_access
from .models import ApiKey, Project, ProjectRole


class ScopedAdminMixin:
    """The one authorization path in the admin: staff who are not superusers see only rows of the
    projects they hold a role in (``access.project_access``, once per request).

    ``project_field`` names a row's project: a foreign key to Project (the default), an integer
    column holding a project's id, or ``pk`` on Project itself. ``view_by_role``: holding any role
    lets staff view (and find in the index) this admin's rows without model permissions, as the run
    log's auditors do; otherwise Django's model permissions decide, as usual.
    ``tests/system/test_endpoint_matrix.py`` requires an entry for every registered admin."""

    project_field = "project"
    view_by_role = False

    def access(self, request) -> ProjectAccess:
        return request_access(request)

    def get_queryset(self, request):
        return self.access(request).apply(super().get_queryset(request), self.project_field)

    def holds_a_role(self, request) -> bool:
        """Whether the viewer sees any project (a person with a role, a superuser)."""
        return self.access(request).sees_any()

    def holds_perm(self, request, perm: str, project_id: int | None = None) -> bool:
        """Whether the viewer holds ``projects.<perm>`` (guardian, through a role) on a visible project:
        ``project_id``'s, or any. Superusers everywhere."""
        if request.user.is_superuser:
            return True
        checker, projects = self._perm_checker(request)
        candidates = [projects[project_id]] if project_id in projects else [] if project_id is not None \
            else projects.values()
        return any(checker.has_perm(perm, p) for p in candidates)

    @staticmethod
    def _perm_checker(request) -> tuple[ObjectPermissionChecker, dict[int, Project]]:
        """One guardian checker per request with the visible projects' permissions prefetched (two
        queries), so that a changelist action or a form asks no query per row."""
        cached = getattr(request, "_project_perm_checker", None)
        if cached is None:
            projects = {p.pk: p for p in Project.objects.visible_to(request_access(request))}
            checker = ObjectPermissionChecker(request.user)
            checker.prefetch_perms(list(projects.values()))
            cached = request._project_perm_checker = (checker, projects)
        return cached

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        """A form's project choices are the viewer's projects only (the stock field lists every project)."""
        if db_field.related_model is Project:
            kwargs["queryset"] = Project.objects.visible_to(self.access(request))
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def has_view_permission(self, request, obj=None):
        return super().has_view_permission(request, obj) or (
            self.view_by_role and request.user.is_staff and self.holds_a_role(request))

    def has_module_permission(self, request):
        return super().has_module_permission(request) or (
            self.view_by_role and request.user.is_staff and self.holds_a_role(request))


class EditedByProjectAdmins(ScopedAdminMixin, admin.ModelAdmin):
    """A project's settings-like rows (prices, budgets, upstreams): visible to every role of the row's
    project; added, changed and deleted by its admins only (``change_project``), who save through the
    app's audited services (``save_model`` calls ``_check`` first)."""

    view_by_role = True

    def _may_change(self, request, obj=None) -> bool:
        return self.holds_perm(request, "change_project", obj.project_id if obj is not None else None)

    def has_add_permission(self, request):
        return self._may_change(request)

    def has_change_permission(self, request, obj=None):
        return self._may_change(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self._may_change(request, obj)

    def _check(self, request, obj) -> None:
        if not self._may_change(request, obj):
            raise PermissionDenied

    # The app's audited services, which every save and delete goes through (a subclass names them;
    # a row that is only ever updated overrides ``save_model`` instead, as the costs' settings do).
    service_fields: tuple[str, ...] = ()

    def service_values(self, form) -> dict:
        """The form's values as the services take them (a subclass converts what differs: USD to nanos)."""
        return {f: form.cleaned_data[f] for f in self.service_fields if f in form.cleaned_data}

    def service_create(self, *, project, actor, values: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def service_update(self, obj, *, actor, values: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def service_delete(self, obj, *, actor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_model(self, request, obj, form, change):
        self._check(request, obj)
        values = self.service_values(form)
        if change:
            self.service_update(obj, actor=request.user, values=values)
        else:
            obj.pk = self.service_create(project=form.cleaned_data["project"], actor=request.user, values=values).pk

    def delete_model(self, request, obj):
        self._check(request, obj)
        self.service_delete(obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)


class VisibleProjectFilter(admin.SimpleListFilter):
    """Filter by project, offering only the projects the viewer may see (the stock related-field
    filter would list every project's name)."""

    title = "project"
    parameter_name = "project"

    def __init__(self, request, params, model, model_admin):
        self.project_field = getattr(model_admin, "project_field", "project")
        super().__init__(request, params, model, model_admin)

    def lookups(self, request, model_admin):
        return [(str(p.pk), p.slug)
                for p in Project.objects.visible_to(request_access(request)).order_by("slug")]

    def queryset(self, request, queryset):
        if self.value():
            if not (self.value().isascii() and self.value().isdigit()):
                return queryset.none()
            return queryset.filter(**{self.project_field: int(self.value())})
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

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        """Keys are minted only in projects whose keys the viewer manages."""
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.related_model is Project and not request.user.is_superuser:
            field.queryset = field.queryset.filter(
                pk__in=[p.pk for p in field.queryset if self.holds_perm(request, "manage_project", p.pk)])
        return field

    def save_model(self, request, obj, form, change):
        if change:
            return  # keys are immutable; revoke and create a new one instead
        if not self.holds_perm(request, "manage_project", obj.project_id):
            raise PermissionDenied
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
        done = skipped = 0
        for key in queryset.filter(revoked_at__isnull=True):
            if self.holds_perm(request, "manage_project", key.project_id):
                services.api_key_revoke(key=key, actor=request.user)
                done += 1
            else:
                skipped += 1
        self.message_user(request, f"{done} keys revoked; {skipped} skipped (not a project you manage).",
                          messages.SUCCESS if not skipped else messages.WARNING)


@admin.register(AuditEvent)
class ScopedAuditEventAdmin(ScopedAdminMixin, AuditEventAdmin):
    """The audit console (``apps.audit.admin``), scoped like every other admin: a row's project is
    its plain ``project_id`` (audit rows keep ids, never foreign keys); rows of no project (system
    events) are for superusers."""

    project_field = "project_id"


class RoleGroupAdmin(GroupAdmin):
    """Groups carry projects' roles (``project:<slug>:<role>``): their names alone tell every project's
    slug, so only superusers see them. People's roles are granted per project (API, project admin)."""

    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


admin.site.unregister(Group)
admin.site.register(Group, RoleGroupAdmin)


class ReadOnlyForRoles(ScopedAdminMixin, admin.ModelAdmin):
    """Rows people never edit in the admin (derived from the run log, per-call rows, decisions made
    elsewhere): read-only for everyone, visible to every role of the row's project."""

    view_by_role = True
    list_per_page = 100
    show_full_result_count = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]
