"""The evals page: regressions flagged first, each agent's quality per evaluator (the pass rate day by day
and by agent version), and the eval jobs with their latest batch's progress, live."""
from __future__ import annotations

from datetime import timedelta

from django.shortcuts import render
from django.utils import timezone

from apps.evals import selectors as evals

from .. import svg
from .base import Page

DAYS = 14
REGRESSIONS_SHOWN = 20


def _quality(access, project_slug):
    today = timezone.now().date()
    days = [today - timedelta(days=n) for n in range(DAYS - 1, -1, -1)]
    rows = evals.quality_by_agent(principal=access, project_slug=project_slug,
                                  since=timezone.now() - timedelta(days=DAYS))
    for row in rows:
        rates = [row["days"].get(d, {}).get("pass_rate") for d in days]
        failed = [(1 - r) if r is not None else 0 for r in rates]
        row["chart"] = svg.sparkbars([1.0 if r is not None else 0 for r in rates], failed, width=140, height=28,
                                     label=f"{row['evaluator']} on {row['agent'] or 'runs'}: the share failing "
                                           f"(red) each day, the last {DAYS} days")
    return rows


class EvalsPage(Page):
    """``?project=`` narrows to one project; ``?fragment=batches`` answers only the batches (the live page
    re-reads them when a batch's progress is published)."""

    template_name = "dashboard/evals.html"
    nav = "evals"

    def batches(self):
        return evals.jobs_with_latest_batch(principal=self.access, project_slug=self.project_param())

    def get(self, request, *args, **kwargs):
        if request.GET.get("fragment") == "batches":
            return render(request, "dashboard/_eval_batches.html", {"jobs": self.batches(),
                                                                   "show_project": len(self.visible_projects) != 1})
        return super().get(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        project = self.project_param()
        window = evals.regressions_of(principal=self.access, project_slug=project)
        version = evals.regressions_of(principal=self.access, project_slug=project, by="version")
        flagged = [r for r in window + version if r["flagged"]]
        others = [r for r in window + version if not r["flagged"] and r["enough_runs"]]
        return {**super().get_context_data(**kwargs), "regressions": (flagged + others)[:REGRESSIONS_SHOWN],
                "flagged_count": len(flagged), "quality": _quality(self.access, project), "days": DAYS,
                "jobs": self.batches(),
                "live_url": "/ws/evals/" + (f"?project={project}" if project else "")}
