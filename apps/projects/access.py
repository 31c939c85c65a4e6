"""The one authorization path: which projects a principal may see, and with which roles.

``project_access(principal)`` is the only place that decides it, for every caller: a person (the
projects they hold a role in; a superuser every project), an :class:`~apps.projects.models.ApiKey`
(its own project, with no person's role) or anyone else (nothing). Everything that scopes to
projects is built on it: ``visible_to(principal)`` on every project-owned queryset
(``models.ProjectOwnedQuerySet``), the API base view (``permissions.ProjectScopedAPIView``) and the
admin mixin (``admin.ScopedAdminMixin``). A new app scopes its rows by using those, never by
filtering on roles or groups itself.

Object permissions within a visible project (``change_project``, ``manage_project``, ...) stay
django-guardian's, through the role's group (``permissions.check_project_perm``).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from django.db.models import QuerySet

from .models import ApiKey, Project, ProjectRole


@dataclass(frozen=True)
class ProjectAccess:
    """What one principal may see: ``roles`` maps each visible project's id to the roles held there
    (empty for an API key); ``everything`` is a superuser's access to every project (``roles`` then
    holds only the roles they were granted)."""

    roles: Mapping[int, frozenset[str]]
    everything: bool = False
    # The slugs of the visible projects, where known without a query (a person's come with their roles).
    slugs: Mapping[int, str] = field(default_factory=dict, repr=False)
    key: ApiKey | None = field(default=None, repr=False)

    def sees_any(self) -> bool:
        """Whether anything is visible at all (a superuser: whether any project exists)."""
        return bool(self.roles) or (self.everything and Project.objects.exists())

    def in_project(self, slug: str) -> ProjectAccess:
        """The same access narrowed to the project ``slug``: nothing if it is not visible."""
        if self.key is not None:
            pid = self.key.project_id if self.key.project.slug == slug else None
        elif self.everything:
            pid = Project.objects.filter(slug=slug).values_list("pk", flat=True).first()
        else:
            pid = next((p for p, s in self.slugs.items() if s == slug), None)
        if pid is None:
            return NOTHING
        return ProjectAccess(roles={pid: self.roles.get(pid, frozenset())},
                             slugs={pid: slug}, key=self.key)

    def apply(self, queryset: QuerySet, project_field: str = "project") -> QuerySet:
        """``queryset`` restricted to the visible projects. ``project_field`` names the row's project:
        a foreign key to Project, an integer column holding a project's id, or ``pk`` on Project itself.
        The ids are a literal list (a person holds few roles): the planner uses each table's
        (project, ...) indexes as it would for one project."""
        if self.everything:
            return queryset
        if not self.roles:
            return queryset.none()
        return queryset.filter(**{f"{project_field}__in": sorted(self.roles)})


NOTHING = ProjectAccess(roles={})


def project_access(principal) -> ProjectAccess:
    """Which projects ``principal`` may see, with which roles: a person (their roles; a superuser
    everything), an API key (its own project, no role) or anything else (nothing). One query for a
    person, none for a key. A ``ProjectAccess`` already computed is returned as it is."""
    if isinstance(principal, ProjectAccess):
        return principal
    if isinstance(principal, ApiKey):
        return ProjectAccess(roles={principal.project_id: frozenset()}, key=principal)
    if principal is None or not getattr(principal, "is_authenticated", False) or principal.pk is None:
        return NOTHING
    roles: dict[int, set[str]] = defaultdict(set)
    slugs: dict[int, str] = {}
    for project_id, slug, role in ProjectRole.objects.filter(group__user=principal).values_list(
            "project_id", "project__slug", "role"):
        roles[project_id].add(role)
        slugs[project_id] = slug
    return ProjectAccess(roles={p: frozenset(r) for p, r in roles.items()}, slugs=slugs,
                         everything=bool(getattr(principal, "is_superuser", False)))


def request_access(request) -> ProjectAccess:
    """``project_access(request.user)``, computed once per request (the admin asks many times a page)."""
    user = request.user
    request = getattr(request, "_request", request)  # a DRF Request wraps Django's: cache on that one
    cached = getattr(request, "_project_access", None)
    if cached is None or cached[0] is not user:
        cached = (user, project_access(user))
        request._project_access = cached
    return cached[1]
