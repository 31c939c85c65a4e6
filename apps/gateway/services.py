"""The gateway's writes (upstreams, by project admins; audited) and its routing table (which
upstreams serve a model, in order), read from the database at most every
``GATEWAY_ROUTES_TTL_SECONDS`` per project."""
from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import transaction

from apps.common.ttl import TTLCache
from apps.projects.models import Project
from apps.projects.services import audit_change, update_audited
from apps.scheduler import selectors as queue

from .models import Upstream


def _changed(project_id: int) -> None:
    """This process reads the project's routes afresh (now, and once the change commits)."""
    _routes.forget(project_id)
    transaction.on_commit(lambda: _routes.forget(project_id))


@transaction.atomic
def upstream_create(*, project: Project, actor, **fields) -> Upstream:
    unknown = set(fields) - set(Upstream.FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of an upstream."})
    upstream = Upstream(project=project, **fields)
    upstream.full_clean(exclude=["project"])
    if Upstream.objects.filter(project=project, name=upstream.name).exists():
        raise ValidationError({"name": "An upstream of this project has this name already."})
    upstream.save()
    audit_change(actor, project, "gateway.upstream_created", upstream, after=upstream.as_dict())
    _changed(project.pk)
    return upstream


@transaction.atomic
def upstream_update(*, upstream: Upstream, actor, **changes) -> Upstream:
    upstream = Upstream.objects.select_for_update().select_related("project").get(pk=upstream.pk)
    _changed(upstream.project_id)
    return update_audited(upstream, changes, Upstream.FIELDS, lambda: upstream.full_clean(exclude=["project"]),
                          actor, "gateway.upstream_updated")


@transaction.atomic
def upstream_delete(*, upstream: Upstream, actor) -> None:
    audit_change(actor, upstream.project, "gateway.upstream_deleted", upstream, before=upstream.as_dict())
    _changed(upstream.project_id)
    upstream.delete()


# --- routing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One upstream as a call uses it (no model instance crosses into the async side)."""

    id: int
    name: str
    base_url: str
    provider: str
    api_key_env: str
    patterns: tuple[str, ...]
    timeout_seconds: float
    max_output_tokens: int | None

    def serves(self, model: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatchcase(model, p) for p in self.patterns)


_routes = TTLCache("GATEWAY_ROUTES_TTL_SECONDS")


def _project_routes(project_id: int) -> list[Route]:
    """The project's enabled upstreams, in priority order (read at most every GATEWAY_ROUTES_TTL_SECONDS)."""
    return _routes.get(project_id, lambda: [
        Route(u.pk, u.name, u.base_url.rstrip("/"), u.provider, u.api_key_env, tuple(u.model_names),
              u.timeout_seconds, u.max_output_tokens)
        for u in Upstream.objects.filter(project_id=project_id, enabled=True).order_by("priority", "id")])


def routes_for(project_id: int, model: str) -> list[Route]:
    """The upstreams that serve ``model`` for the project, first choice first."""
    return [r for r in _project_routes(project_id) if r.serves(model)]


_local = TTLCache("GATEWAY_ROUTES_TTL_SECONDS")


def served_locally(project_id: int, model: str) -> bool:
    """Whether one of the project's GPU backends serves ``model`` (its calls then go through the queue,
    never to an upstream); read at most every GATEWAY_ROUTES_TTL_SECONDS per project."""
    return model in _local.get(project_id, lambda: frozenset(queue.local_models(project_id)))


def models_of(project_id: int) -> list[str]:
    """The model names the project's GPU backends and upstreams serve (globs left out: they name no one
    model)."""
    names: list[str] = sorted(_local.get(project_id, lambda: frozenset(queue.local_models(project_id))))
    for r in _project_routes(project_id):
        for p in r.patterns:
            if not any(c in p for c in "*?[") and p not in names:
                names.append(p)
    return names
