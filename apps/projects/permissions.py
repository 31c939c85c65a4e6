"""Permission checks shared by every API view: scopes for keys, roles for people; and the base view
that applies the one authorization path (``access.project_access``) to an API."""
from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.views import APIView

from apps.common.errors import ApiError, ErrorCode

from .access import ProjectAccess, request_access
from .models import SLUG_RE, ApiKey, Project


def is_agent(request) -> bool:
    return isinstance(request.user, ApiKey)


class PersonOnly(BasePermission):
    """Approving, steering the queue and managing keys or members are for people, never agent keys."""

    def has_permission(self, request, view):
        if is_agent(request):
            raise PermissionDenied("This action is for people; an API key cannot perform it.",
                                   code=ErrorCode.PERSON_ONLY)
        return bool(request.user and request.user.is_authenticated)


def require_scope(request, scope: str) -> None:
    """An agent key must hold ``scope``; a person is judged by role on the object instead."""
    if is_agent(request) and not request.user.has_scope(scope):
        raise PermissionDenied(f"This API key lacks the '{scope}' scope.", code=ErrorCode.MISSING_SCOPE)


def HasScope(scope: str):  # noqa: N802 - reads like a class in permission_classes
    class _HasScope(BasePermission):
        def has_permission(self, request, view):
            require_scope(request, scope)
            return True

    _HasScope.__name__ = f"HasScope_{scope}"
    return _HasScope


def access_project(request, slug: str) -> Project:
    """The project ``slug`` if the caller may see it, else 404 (never 403: it does not leak existence)."""
    try:
        return Project.objects.visible_to(request_access(request)).get(slug=slug)
    except Project.DoesNotExist:
        raise Http404 from None


def check_project_perm(request, project: Project, perm: str) -> None:
    """A person must hold ``projects.<perm>`` on the project (through a role), else 403."""
    if is_agent(request):
        raise PermissionDenied("This action is for people; an API key cannot perform it.",
                               code=ErrorCode.PERSON_ONLY)
    if not request.user.has_perm(f"projects.{perm}", project):
        raise PermissionDenied("Your role in this project does not allow this.",
                               code=ErrorCode.PERMISSION_DENIED)


class ProjectScopedAPIView(APIView):
    """Base of every API view that reads or writes a project's data: authenticated callers only, and
    the scoping helpers built on ``access.project_access`` (computed once per request). Views add
    their scope and role checks (``HasScope``, ``PersonOnly``, ``require_scope``, ``require_perm``);
    ``tests/system/test_endpoint_matrix.py`` holds what each endpoint requires."""

    permission_classes = [IsAuthenticated]

    @property
    def access(self) -> ProjectAccess:
        return request_access(self.request)

    def visible(self, queryset: QuerySet, *, project_slug: str | None = None) -> QuerySet:
        """``queryset`` (of a project-owned model) restricted to what the caller may see."""
        return queryset.visible_to(self.access, project_slug=project_slug)

    def get_project(self, slug: str) -> Project:
        """The project ``slug`` if the caller may see it, else 404 (never 403)."""
        return access_project(self.request, slug)

    def require_scope(self, scope: str) -> None:
        require_scope(self.request, scope)

    def require_perm(self, project: Project, perm: str) -> None:
        """A person holding ``projects.<perm>`` on the project; an API key is refused (person_only)."""
        check_project_perm(self.request, project, perm)


def project_param(request) -> str | None:
    """``?project=`` (a slug, for people who see several projects), or None; 400 if it cannot be one."""
    slug = request.query_params.get("project") or None
    if slug is not None and not SLUG_RE.fullmatch(slug):
        raise ApiError(ErrorCode.INVALID_REQUEST, "project must be a project slug.", details={"field": "project"})
    return slug
