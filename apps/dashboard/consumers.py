"""The pages' live channels: thin consumers that subscribe a signed-in person to the run log's live
groups and forward what they may see, re-checked on every message (paperless-ngx's pattern).

Each consumer checks at connect (close 4403 for nobody, 4404 for what the person cannot see) and
again for every event, with a fresh ``project_access``: a role revoked while a page is open stops
the messages at once. What is sent is rendered by the same templates and selectors as the page, so a
live row is the row a reload would show; a lost message only delays the page, which re-reads its
data on reconnect.
"""
from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404, QueryDict
from django.template.loader import render_to_string

from apps.approvals import live as approvals_live
from apps.budgets import live as budgets_live
from apps.evals import live as evals_live
from apps.projects.access import ProjectAccess, project_access
from apps.projects.models import SLUG_RE, Project
from apps.scheduler import live as queue_live
from apps.traces import selectors as traces

from . import filters
from .views.runs import with_scores

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_INVALID = 4400


def _sees(access: ProjectAccess, project_id: int) -> bool:
    return access.everything or project_id in access.roles


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """Base: authenticate, ``subscribe()`` to groups (None: not found), forward ``run.updated`` events
    through ``message(event)`` (None: nothing to send), which runs in a thread with database access."""

    async def connect(self):
        self.joined: list[str] = []
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.refuse(CLOSE_FORBIDDEN)
            return
        groups = await database_sync_to_async(self.subscribe)()
        if groups is None:
            await self.refuse(getattr(self, "close_code", CLOSE_NOT_FOUND))
            return
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.joined = groups
        await self.accept()

    async def refuse(self, code: int) -> None:
        """Accept, then close with ``code``: a handshake refused outright reaches the browser as 1006
        with no reason, and the page could not tell "not allowed" (stop) from "server away" (retry)."""
        await self.accept()
        await self.close(code=code)

    async def disconnect(self, code):
        for group in self.joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def run_updated(self, event):
        message = await database_sync_to_async(self.message)(event)
        if message is not None:
            await self.send_json(message)

    # --- for subclasses (synchronous, in a thread) ---

    def access(self) -> ProjectAccess:
        return project_access(self.scope["user"])

    def query(self) -> QueryDict:
        return QueryDict(self.scope.get("query_string", b"").decode("latin-1"))

    def narrowed_access(self) -> ProjectAccess | None:
        """The person's access, narrowed to ``?project=`` when given (None: not a project slug)."""
        access = self.access()
        slug = self.query().get("project")
        if slug:
            if not SLUG_RE.fullmatch(slug):
                return None
            access = access.in_project(slug)
        return access

    def project_ids(self, access: ProjectAccess) -> list[int]:
        ids = Project.objects.visible_to(access).values_list("pk", flat=True) if access.everything else access.roles
        return sorted(ids)

    def project_groups(self, access: ProjectAccess) -> list[str]:
        return [traces.project_runs_group(pid) for pid in self.project_ids(access)]

    def subscribe(self) -> list[str] | None:
        raise NotImplementedError

    def message(self, event: dict) -> dict | None:
        raise NotImplementedError


class RunListConsumer(LiveConsumer):
    """``/ws/runs/?<the page's filters>``: a run that changed is sent as its rendered row when it matches
    the filters (new ones go on top), or as ``remove`` when it no longer does."""

    def subscribe(self):
        self.form = filters.parse(self.query())
        if not self.form.is_valid():
            self.close_code = CLOSE_INVALID
            return None
        access = self.access()
        if self.form.cleaned_data.get("project"):
            access = access.in_project(self.form.cleaned_data["project"])
        return self.project_groups(access)

    def message(self, event):
        access = self.access()
        if not _sees(access, event["project_id"]):
            return None
        run = (filters.apply(access, self.form).filter(pk=event["run_pk"]).select_related("project", "api_key")
               .first())
        if run is None:
            return {"type": "remove", "key": event["run_pk"]}
        show_project = access.everything or len(access.roles) != 1
        with_scores([run])
        return {"type": "row", "key": run.pk,
                "html": render_to_string("dashboard/_run_row.html", {"run": run, "show_project": show_project})}


class OverviewConsumer(LiveConsumer):
    """``/ws/overview/?project=``: a nudge (``changed``) whenever a visible run moves, a budget crosses a
    threshold or an approval is asked for or decided; the page re-reads its tiles (debounced on the page, so a burst of runs costs one re-read)."""

    def subscribe(self):
        access = self.narrowed_access()
        if access is None:
            return None
        ids = self.project_ids(access)
        return ([traces.project_runs_group(pid) for pid in ids]
                + [budgets_live.project_alerts_group(pid) for pid in ids]
                + [approvals_live.project_group(pid) for pid in ids]
                + [queue_live.project_group(pid) for pid in ids])

    def message(self, event):
        return {"type": "changed"} if _sees(self.access(), event["project_id"]) else None

    async def budget_alert(self, event):
        """A budget crossed a threshold: the tiles are re-read as for a run."""
        await self.run_updated(event)

    async def approval_changed(self, event):
        """An approval was asked for or decided: the pending-approvals tile is re-read with the others."""
        await self.run_updated(event)

    async def queue_task(self, event):
        """A queue task moved: the queue tile is re-read with the others."""
        await self.run_updated(event)

    async def queue_changed(self, event):
        await self.run_updated(event)


class InboxConsumer(LiveConsumer):
    """``/ws/inbox/?project=``: a nudge whenever an approval of a visible project is asked for, decided,
    consumed, cancelled or expired; the inbox re-reads its pending list."""

    def subscribe(self):
        access = self.narrowed_access()
        if access is None:
            return None
        return [approvals_live.project_group(pid) for pid in self.project_ids(access)]

    def message(self, event):
        return {"type": "changed", "approval": event["state"]} if _sees(self.access(), event["project_id"]) else None

    async def approval_changed(self, event):
        await self.run_updated(event)


class EvalsConsumer(LiveConsumer):
    """``/ws/evals/?project=``: a nudge whenever a batch of a visible project moves (a chunk committed, it
    finished, failed or was cancelled); the evals page re-reads its batches."""

    def subscribe(self):
        access = self.narrowed_access()
        if access is None:
            return None
        return [evals_live.project_group(pid) for pid in self.project_ids(access)]

    def message(self, event):
        return {"type": "changed", "state": event["state"]} if _sees(self.access(), event["project_id"]) else None

    async def evals_job_progress(self, event):
        await self.run_updated(event)


class QueueConsumer(LiveConsumer):
    """``/ws/queue/?project=``: a nudge whenever a task of a visible project moves (submitted, admitted,
    started, ended, steered) or its queue's figures or controls change; the queue page re-reads itself."""

    def subscribe(self):
        access = self.narrowed_access()
        if access is None:
            return None
        return [queue_live.project_group(pid) for pid in self.project_ids(access)]

    def message(self, event):
        if not _sees(self.access(), event["project_id"]):
            return None
        return {"type": "changed", "state": event.get("state", "")}

    async def queue_task(self, event):
        await self.run_updated(event)

    async def queue_changed(self, event):
        await self.run_updated(event)


class RunConsumer(LiveConsumer):
    """``/ws/runs/<project>/<run_id>/``: a nudge whenever the run or one of its child runs moves."""

    def subscribe(self):
        kwargs = self.scope["url_route"]["kwargs"]
        try:
            run = traces.run_get(principal=self.access(), run_id=kwargs["run_id"], project_slug=kwargs["project"])
        except Http404:
            return None
        self.run_pk, self.project_id = run.pk, run.project_id
        return [traces.run_group(run.pk)]

    def message(self, event):
        if not _sees(self.access(), self.project_id):
            return None
        return {"type": "changed", "run_pk": event["run_pk"], "status": event["run"]["status"],
                "new_spans": event.get("new_spans", []), "updated_spans": event.get("updated_spans", [])}


