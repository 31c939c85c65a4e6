"""The overview's tiles. A tile is a template under ``templates/dashboard/tiles/`` and a function that
builds its context from the caller's access (and the ``?project=`` narrowing) through its app's
selectors. A later app (costs, approvals, evals, the queue) adds its tile by appending to ``TILES``;
the overview renders them in order, and re-renders them all when a live message says something moved.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


TILES: list[Tile] = [
    Tile("runs", "dashboard/tiles/runs.html", _runs),
]


def render_context(access, project_slug: str | None) -> list[dict]:
    """Each tile's context, with ``project_q`` (the ``project=...&`` its links keep)."""
    project_q = f"project={project_slug}&" if project_slug else ""
    return [{"key": t.key, "template": t.template, "project_q": project_q, **t.build(access, project_slug)}
            for t in TILES]
