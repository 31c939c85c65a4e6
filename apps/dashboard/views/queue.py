"""The live queue (``/queue/``): per project, its devices (memory held by tasks and models against what
admission may give, NVML's live reading), its backends (queued, running, draining), the open tasks (who
asked, the model, the backend, the age, the position), and the paused and throttled states; live over
``/ws/queue/``. Operators (``operate_project``) get the controls: each button asks for confirmation and a
reason, then calls the API with the session and the CSRF token, where the role is checked and the action
audited (``static/dashboard/queue.js``); a double-click on a task opens its dispatch history and its run."""
from __future__ import annotations

from django.http import Http404
from django.shortcuts import render
from django.utils import timezone
from guardian.core import ObjectPermissionChecker

from apps.projects.models import Project
from apps.scheduler import selectors as queue

from .base import Page

OPEN_ROWS = 100
RECENT_ROWS = 20


class QueuePage(Page):
    """``?fragment=queue`` answers the projects' sections only (re-read live on every change). Queries per
    project shown: its state (controls, devices, readings, held memory, loaded models, backend counts,
    depth, waits) and its open and recent tasks."""

    template_name = "dashboard/queue.html"
    nav = "queue"

    def sections(self) -> list[dict]:
        slug = self.project_param()
        projects = Project.objects.visible_to(self.access, project_slug=slug).order_by("slug")
        if slug is not None and not projects:
            raise Http404
        checker = ObjectPermissionChecker(self.request.user)
        checker.prefetch_perms(list(projects))
        now = timezone.now()
        out = []
        for project in projects:
            state = queue.queue_state(project=project, now=now)
            rows = queue.open_tasks(project=project, limit=OPEN_ROWS)
            positions = _positions(rows)
            backends = [b.backend.name for b in state.backends if b.backend.enabled]
            out.append({"project": project, "state": state, "backends": backends,
                        "may_operate": checker.has_perm("projects.operate_project", project),
                        "tasks": [{"t": t, "age_ms": (now - t.created_at).total_seconds() * 1000,
                                   "position": positions.get(t.pk)} for t in rows],
                        "recent": queue.recent_tasks(project=project, limit=RECENT_ROWS)})
        return out

    def get(self, request, *args, **kwargs):
        if request.GET.get("fragment") == "queue":
            return render(request, "dashboard/_queue_sections.html", {"sections": self.sections(),
                                                                     **self.nav_context()})
        return super().get(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        project = self.project_param()
        return {**super().get_context_data(**kwargs), "sections": self.sections(),
                "live_url": "/ws/queue/" + (f"?project={project}" if project else "")}


def _positions(rows) -> dict[int, int]:
    """Each queued row's place on its device (1 is next), from the rows already read in queue order."""
    seen: dict[int, int] = {}
    out = {}
    for t in rows:
        if t.state == "queued":
            seen[t.device_id] = seen.get(t.device_id, 0) + 1
            out[t.pk] = seen[t.device_id]
    return out
