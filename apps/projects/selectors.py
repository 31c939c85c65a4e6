from __future__ import annotations

from collections import defaultdict

from .models import Project, ProjectRole


def roles_by_project(user) -> dict[int, list[str]]:
    """{project_id: [roles]} for a person, in one query."""
    result: dict[int, list[str]] = defaultdict(list)
    for project_id, role in ProjectRole.objects.filter(group__user=user).values_list("project_id", "role"):
        result[project_id].append(role)
    return {k: sorted(v) for k, v in result.items()}


def project_members(project: Project) -> list[dict]:
    """Every person holding a role in the project, with their roles, in one query."""
    members: dict[str, list[str]] = defaultdict(list)
    rows = ProjectRole.objects.filter(project=project, group__user__isnull=False).values_list(
        "group__user__username", "role")
    for username, role in rows:
        members[username].append(role)
    return [{"username": u, "roles": sorted(r)} for u, r in sorted(members.items())]
