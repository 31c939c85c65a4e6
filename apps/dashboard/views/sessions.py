"""A session's page: the runs of one conversation as a timeline of turns, with running totals of
tokens and cache hits, and the session's tool calls below, page by page."""
from __future__ import annotations

from decimal import Decimal

from django.http import Http404

from apps.traces import selectors

from .. import cursor
from .base import Page

TOOL_CALLS_PAGE = 50
BAR_WIDTH = 1000  # the bars' SVG coordinates; the SVG stretches to the column
BAR_MIN = 2  # a turn of a few milliseconds in an hour-long session still shows


def _bars(session: dict) -> None:
    """Each turn's bar (``x``, ``width`` in 0..BAR_WIDTH) on the session's scale, from its first start to
    its latest end; a turn still running has no duration and is drawn as a mark at its start."""
    scale = BAR_WIDTH / (session["span_ms"] or 1)
    for turn in session["turns"]:
        x = min(turn["offset_ms"] * scale, BAR_WIDTH - BAR_MIN)
        width = max((turn["duration_ms"] or 0) * scale, BAR_MIN)
        turn["bar"] = {"x": round(float(x), 1), "width": round(float(min(width, BAR_WIDTH - x)), 1),
                       "open": turn["duration_ms"] is None}


def _costs(session: dict, runs) -> None:
    """Each turn's cost (its run's own; None when nothing of it was priced) and the session's running
    total up to it, from one query over the turns' runs (the same order and bound as the turns)."""
    costs = dict(runs.order_by("started_at", "id").values_list("run_id", "cost_usd")[:len(session["turns"])])
    total, priced = Decimal(0), False
    for turn in session["turns"]:
        turn["cost_usd"] = costs.get(turn["run_id"])
        if turn["cost_usd"] is not None:
            total, priced = total + turn["cost_usd"], True
        turn["cumulative_cost_usd"] = total if priced else None
    session["cost_usd"] = total if priced else None


class SessionPage(Page):
    """``/sessions/<project>/<session id>/``: 404 when the person sees no run of that session in that
    project. ``?after=`` is the tool calls' cursor. A fixed number of queries past the layout's: the turns,
    their tool call counts, their costs and one page of tool calls."""

    template_name = "dashboard/session.html"
    nav = "runs"

    def get_context_data(self, **kwargs):
        project, session_id = self.kwargs["project"], self.kwargs["session_id"]
        if "\x00" in session_id:
            raise Http404  # no session id holds one, and PostgreSQL refuses it in a query
        session = selectors.session_detail(principal=self.access, session_id=session_id, project_slug=project)
        _bars(session)
        _costs(session, selectors.session_runs(principal=self.access, session_id=session_id, project_slug=project))
        tool_calls, next_cursor = cursor.page(
            selectors.session_tool_calls(principal=self.access, session_id=session_id, project_slug=project),
            self.request.GET.get("after"), size=TOOL_CALLS_PAGE, descending=False)
        return {**super().get_context_data(**kwargs), "session": session, "tool_calls": tool_calls,
                "next_cursor": next_cursor, "first_page": not self.request.GET.get("after")}
