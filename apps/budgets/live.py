"""What budgets tell the live pages: a threshold crossed is published, after its transaction commits, to
its project's alerts group (the overview subscribes; the database stays the truth, a lost message only
delays the page)."""
from __future__ import annotations

from apps.common import live


def project_alerts_group(project_id: int) -> str:
    """The live group of one project's budget alerts."""
    return f"budgets.project.{project_id}.alerts"


def publish_alert(*, project_id: int, budget_id: int, threshold: int) -> None:
    live.publish_many([(project_alerts_group(project_id), {
        "type": "budget.alert", "project_id": project_id, "budget_id": budget_id, "threshold": threshold})])
