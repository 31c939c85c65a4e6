"""The overview at ``/``: the tiles of ``tiles.TILES`` for the caller's projects, live."""
from __future__ import annotations

from django.shortcuts import render

from .. import tiles
from .base import Page


class OverviewPage(Page):
    """``?fragment=tiles`` answers only the tiles: the live page re-reads them when a message says
    something moved (the database stays the truth; a lost message only delays the page)."""

    template_name = "dashboard/overview.html"
    nav = "overview"

    def get(self, request, *args, **kwargs):
        if request.GET.get("fragment") == "tiles":
            return render(request, "dashboard/_tiles.html",
                          {"tiles": tiles.render_context(self.access, self.project_param())})
        return super().get(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        project = self.project_param()
        return {**super().get_context_data(**kwargs), "tiles": tiles.render_context(self.access, project),
                "live_url": "/ws/overview/" + (f"?project={project}" if project else "")}
