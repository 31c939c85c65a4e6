"""The agents page: each agent version's runs, outcomes, latency and tokens over a window, with the
change from one version to the next marked, and each version linked to its runs."""
from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django.utils import timezone

from apps.budgets import selectors as budgets
from apps.evals import selectors as evals
from apps.traces import selectors

from .base import Page

WINDOWS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
DEFAULT_WINDOW = "7d"


def _grouped(rows: list[dict]) -> list[dict]:
    """``agent_stats`` rows (sorted by project, agent, newest version first) as one group per agent.
    Each version but an agent's oldest in the window followed another: ``new_since`` says when."""
    groups: list[dict] = []
    for row in rows:
        if not groups or (groups[-1]["project"], groups[-1]["agent_name"]) != (row["project"], row["agent_name"]):
            groups.append({"project": row["project"], "agent_name": row["agent_name"], "versions": []})
        query = {"project": row["project"], "agent": row["agent_name"], "agent_version": row["agent_version"]}
        groups[-1]["versions"].append({**row, "runs_query": urlencode({k: v for k, v in query.items() if v})})
    for group in groups:
        versions = group["versions"]
        for newer in versions[:-1]:
            newer["new_since"] = newer["first_started_at"]
    return groups


class AgentsPage(Page):
    """``?window=`` 24h, 7d (the default, also for a value it does not know) or 30d; ``?project=``
    narrows to one project. Four queries past the layout's, five on SQLite (``traces.selectors.agent_stats``,
    the spend per version from ``budgets.selectors.agent_costs``, people's feedback and the evaluators'
    pass rate from ``evals.selectors.agent_quality``)."""

    template_name = "dashboard/agents.html"
    nav = "agents"

    def get_context_data(self, **kwargs):
        window = self.request.GET.get("window")
        if window not in WINDOWS:
            window = DEFAULT_WINDOW
        since = timezone.now() - WINDOWS[window]
        rows = selectors.agent_stats(principal=self.access, project_slug=self.project_param(), since=since)
        costs = budgets.agent_costs(principal=self.access, project_slug=self.project_param(), since=since)
        quality = evals.agent_quality(principal=self.access, project_slug=self.project_param(), since=since)
        for row in rows:
            q = row["quality"] = quality.get((row["project"], row["agent_name"], row["agent_version"]))
            row["feedback_rate"] = q["feedback_runs"] / row["runs"] if q and row["runs"] else None
            row["cost"] = cost = costs.get((row["project"], row["agent_name"], row["agent_version"]))
            row["cost_per_run"] = cost["cost_usd"] / row["runs"] if cost and cost["calls"] and row["runs"] else None
        return {**super().get_context_data(**kwargs), "agents": _grouped(rows), "window": window,
                "windows": list(WINDOWS)}
