"""The overview's tiles. A tile is a template under ``templates/dashboard/tiles/`` and a function that
builds its context from the caller's access (and the ``?project=`` narrowing) through its app's
selectors. A later app (costs, approvals, evals, the queue) adds its tile by appending to ``TILES``;
the overview renders them in order, and re-renders them all when a live message says something moved.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from apps.approvals import selectors as approvals
from apps.budgets import selectors as budgets
from apps.evals import selectors as evals
from apps.scheduler import selectors as queue
from apps.traces import selectors as traces

from . import svg


@dataclass(frozen=True)
class Tile:
    key: str
    template: str
    build: Callable[..., dict]  # build(access, project_slug) -> the template's context


def _runs(access, project_slug):
    stats = traces.overview(principal=access, project_slug=project_slug)
    stats["runs_chart"] = svg.sparkbars([h["runs"] for h in stats["hourly"]], [h["failed"] for h in stats["hourly"]],
                                        label="Runs per hour (failed in red)")
    stats["tokens_chart"] = svg.sparkbars([h["tokens"] for h in stats["hourly"]], label="Tokens per hour")
    return {"stats": stats}


TILE_ROWS = 5
SPIKE_DAYS = 7
UNPRICED_DAYS = 30


def _spend(access, project_slug):
    """Today's spend against yesterday's and the trailing average, with the days as bars."""
    spend = budgets.spend_today(principal=access, project_slug=project_slug)
    spend["chart"] = svg.sparkbars([float(usd) for _, usd in spend["days"]],
                                   label=f"Spend per day, the last {len(spend['days'])} days")
    avg = spend["trailing_avg_usd"]
    spend["vs_avg"] = spend["today_usd"] / avg if avg else None
    return {"spend": spend}


def _spikes(access, project_slug):
    since = budgets.today_in("UTC") - timedelta(days=SPIKE_DAYS)
    return {"spikes": budgets.spikes(principal=access, project_slug=project_slug, since=since, limit=TILE_ROWS),
            "spike_days": SPIKE_DAYS}


def _unpriced(access, project_slug):
    rows = budgets.unpriced(principal=access, project_slug=project_slug,
                            since=budgets.today_in("UTC") - timedelta(days=UNPRICED_DAYS - 1))
    return {"unpriced": rows[:TILE_ROWS], "unpriced_calls": sum(r["calls"] for r in rows),
            "unpriced_models": len(rows), "unpriced_days": UNPRICED_DAYS}


def _budgets(access, project_slug):
    """Budgets at or past their first threshold (80 % without one), most used first; thresholds crossed today."""
    board = budgets.budget_board(principal=access, project_slug=project_slug)
    hot = [b for b in board if b["level"] != "ok"]
    return {"budgets": hot[:TILE_ROWS], "budgets_over": sum(1 for b in board if b["level"] == "over"),
            "budgets_near": sum(1 for b in board if b["level"] == "near"), "budgets_count": len(board),
            "budget_alerts": budgets.budget_alerts(principal=access, project_slug=project_slug,
                                                   since=timezone.now() - timedelta(days=1), limit=TILE_ROWS)}


def _approvals(access, project_slug):
    """What waits for a decision: how many, the oldest, how many are overdue; the longest waiting."""
    summary = approvals.pending_summary(principal=access, project_slug=project_slug)
    oldest = approvals.pending(principal=access, project_slug=project_slug, limit=TILE_ROWS) if summary["count"] else []
    now = timezone.now()
    return {"approvals": summary, "approvals_oldest": [
        {"a": a, "age_ms": (now - a.created_at).total_seconds() * 1000,
         "overdue": a.overdue_at is not None and a.overdue_at <= now} for a in oldest]}


def _regressions(access, project_slug):
    """Evaluators whose pass rate or mean score fell significantly in the last day against the week
    before it (``evals.regressions``), the largest drop first."""
    items = evals.regressions_of(principal=access, project_slug=project_slug)
    flagged = [i for i in items if i["flagged"]]
    return {"regressions": flagged[:TILE_ROWS], "regressions_count": len(flagged),
            "regressions_compared": len(items)}


def _queue(access, project_slug):
    """The GPU queue: how many tasks wait and for how long the oldest, how many run, what is paused."""
    return {"queue": queue.queue_summary(principal=access, project_slug=project_slug)}


TILES: list[Tile] = [
    Tile("runs", "dashboard/tiles/runs.html", _runs),
    Tile("spend", "dashboard/tiles/spend.html", _spend),
    Tile("budgets", "dashboard/tiles/budgets.html", _budgets),
    Tile("approvals", "dashboard/tiles/approvals.html", _approvals),
    Tile("regressions", "dashboard/tiles/regressions.html", _regressions),
    Tile("queue", "dashboard/tiles/queue.html", _queue),
    Tile("spikes", "dashboard/tiles/spikes.html", _spikes),
    Tile("unpriced", "dashboard/tiles/unpriced.html", _unpriced),
]


def render_context(access, project_slug: str | None) -> list[dict]:
    """Each tile's context, with ``project_q`` (the ``project=...&`` its links keep)."""
    project_q = f"project={project_slug}&" if project_slug else ""
    return [{"key": t.key, "template": t.template, "project_q": project_q, **t.build(access, project_slug)}
            for t in TILES]
