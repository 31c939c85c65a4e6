from __future__ import annotations

from collections import defaultdict

from .access import project_access
from .models import Project, ProjectRole


def roles_by_project(principal) -> dict[int, list[str]]:
    """{project_id: [roles]} for a person (or a ``ProjectAccess``), in one query; a key holds none."""
    return {pid: sorted(roles) for pid, roles in project_access(principal).roles.items() if roles}


def project_members(project: Project) -> list[dict]:
    """Every person holding a role in the project, with their roles, in one query."""
    members: dict[str, list[str]] = defaultdict(list)
    rows = ProjectRole.objects.filter(project=project, group__user__isnull=False).values_list(
        "group__user__username", "role")
    for username, role in rows:
        members[username].append(role)
    return [{"username": u, "roles": sorted(r)} for u, r in sorted(members.items())]


def projects_visible_to(principal) -> list[dict]:
    """The projects a person (or a ``ProjectAccess``) may see, as ``{"id", "slug", "name", "roles"}``
    in slug order (one query): the pages' project picker."""
    access = project_access(principal)
    return [{"id": pk, "slug": slug, "name": name, "roles": sorted(access.roles.get(pk, ()))}
            for pk, slug, name in Project.objects.visible_to(access).values_list("pk", "slug", "name")]
