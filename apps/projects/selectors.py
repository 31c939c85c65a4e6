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
