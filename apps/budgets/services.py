"""Costs' writes that people make (price overrides, cost settings), each audited in its transaction.
Per-call writes (span costs, rollups) are the projection's, in ``rollups``; repairs in ``rederive``."""
from __future__ import annotations

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction

from apps.audit.services import audit_record
from apps.projects.models import Project, url_allowed, validate_webhook_allowlist
from apps.projects.services import actor_for

from .models import CostSettings, PriceOverride

OVERRIDE_FIELDS = ("provider", "model_pattern", "effective_from", *PriceOverride.PRICE_FIELDS, "note")


def _audit(actor, project: Project, action: str, obj, *, before=None, after=None) -> None:
    audit_record(actor=actor_for(actor, project), action=action, object_type=obj._meta.label_lower,
                 object_id=obj.pk, object_repr=str(obj), project_id=project.pk, project_slug=project.slug,
                 before=before, after=after)


@transaction.atomic
def price_override_create(*, project: Project, actor, **fields) -> PriceOverride:
    """A project's own price from a date. Calls priced from then on use it (spans already priced keep
    their price until ``costs_rederive`` re-prices their days)."""
    override = PriceOverride(project=project, created_by=actor if isinstance(actor, AbstractBaseUser) else None,
                             **fields)
    override.full_clean()
    override.save()
    _audit(actor, project, "budgets.price_override_created", override, after=override.as_dict())
    return override


@transaction.atomic
def price_override_update(*, override: PriceOverride, actor, **changes) -> PriceOverride:
    override = PriceOverride.objects.select_for_update().get(pk=override.pk)
    before = override.as_dict()
    for field, value in changes.items():
        if field not in OVERRIDE_FIELDS:
            raise ValidationError({field: "is not a field of a price override."})
        setattr(override, field, value)
    override.full_clean()
    after = override.as_dict()
    if after != before:
        override.save()
        changed = [k for k in after if after[k] != before[k]]
        _audit(actor, override.project, "budgets.price_override_updated", override,
               before={k: before[k] for k in changed}, after={k: after[k] for k in changed})
    return override


@transaction.atomic
def price_override_delete(*, override: PriceOverride, actor) -> None:
    _audit(actor, override.project, "budgets.price_override_deleted", override, before=override.as_dict())
    override.delete()


def cost_settings_for(project: Project) -> CostSettings:
    """The project's cost settings (the defaults, unsaved, if it never changed them)."""
    return CostSettings.objects.filter(project=project).first() or CostSettings(project=project)


@transaction.atomic
def cost_settings_update(*, project: Project, actor, **changes) -> CostSettings:
    settings_ = CostSettings.objects.select_for_update().filter(project=project).first() or CostSettings(project=project)
    before = settings_.as_dict()
    for field, value in changes.items():
        if field not in CostSettings.FIELDS:
            raise ValidationError({field: "is not a cost setting."})
        setattr(settings_, field, value)
    settings_.full_clean(exclude=["project"])
    allowlist = Project.objects.filter(pk=project.pk).values_list("webhook_allowlist", flat=True).get()
    if settings_.webhook_url and not url_allowed(settings_.webhook_url, validate_webhook_allowlist(allowlist)):
        raise ValidationError({"webhook_url": "is not on the project's webhook allowlist."})
    if not isinstance(settings_.alert_emails, list) or len(settings_.alert_emails) > 20 or not all(
            isinstance(e, str) and "@" in e and len(e) <= 254 for e in settings_.alert_emails):
        raise ValidationError({"alert_emails": "A list of at most 20 email addresses."})
    after = settings_.as_dict()
    if after != before or settings_.pk is None:
        settings_.save()
        changed = [k for k in after if after[k] != before[k]]
        if changed:
            _audit(actor, project, "budgets.cost_settings_updated", settings_,
                   before={k: before[k] for k in changed}, after={k: after[k] for k in changed})
    return settings_
