"""Costs' writes that people make (price overrides, cost settings, budgets), each audited in its
transaction. Per-call writes are not audited: span costs and rollups are the projection's
(``rollups``), reservations the ledger's (``ledger``, re-exported below); repairs are in ``rederive``."""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.common.ttl import TTLCache
from apps.projects.models import ApiKey, Project, url_allowed, validate_webhook_allowlist
from apps.projects.services import audit_change, update_audited

from . import ledger
from .models import Budget, CostSettings, PriceOverride, Reservation

OVERRIDE_FIELDS = ("provider", "model_pattern", "effective_from", *PriceOverride.PRICE_FIELDS, "note")


_audit = audit_change


@transaction.atomic
def price_override_create(*, project: Project, actor, **fields) -> PriceOverride:
    """A project's own price from a date. Calls priced from then on use it (spans already priced keep
    their price until ``costs_rederive`` re-prices their days)."""
    _prices_changed(project.pk)
    override = PriceOverride(project=project, created_by=actor if isinstance(actor, AbstractBaseUser) else None,
                             **fields)
    override.full_clean()
    override.save()
    _audit(actor, project, "budgets.price_override_created", override, after=override.as_dict())
    return override


@transaction.atomic
def price_override_update(*, override: PriceOverride, actor, **changes) -> PriceOverride:
    _prices_changed(override.project_id)
    override = PriceOverride.objects.select_for_update().get(pk=override.pk)
    return update_audited(override, changes, OVERRIDE_FIELDS, override.full_clean, actor, "budgets.price_override_updated")


@transaction.atomic
def price_override_delete(*, override: PriceOverride, actor) -> None:
    _prices_changed(override.project_id)
    _audit(actor, override.project, "budgets.price_override_deleted", override, before=override.as_dict())
    override.delete()


def cost_settings_for(project: Project) -> CostSettings:
    """The project's cost settings (the defaults, unsaved, if it never changed them)."""
    return CostSettings.objects.filter(project=project).first() or CostSettings(project=project)


@transaction.atomic
def cost_settings_update(*, project: Project, actor, **changes) -> CostSettings:
    _prices_changed(project.pk)
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


# --- budgets (caps) -------------------------------------------------------------------------------

BUDGET_FIELDS = Budget.FIELDS


def _budget_clean(budget: Budget) -> None:
    budget.full_clean(exclude=["project", "created_by"])
    if budget.scope == Budget.Scope.API_KEY and not ApiKey.objects.filter(project=budget.project,
                                                                         pk=int(budget.value)).exists():
        raise ValidationError({"value": "is not an API key of this project."})
    if Budget.objects.filter(project=budget.project, name=budget.name).exclude(pk=budget.pk).exists():
        raise ValidationError({"name": "A budget of this project has this name already."})


def _budgets_changed(project_id: int) -> None:
    """This process reads the project's budgets afresh (now, and once the change commits)."""
    ledger.forget_budgets(project_id)
    transaction.on_commit(lambda: ledger.forget_budgets(project_id))


@transaction.atomic
def budget_create(*, project: Project, actor, **fields) -> Budget:
    """A cap on a scope's spend per day or month. Reservations from now on are held against it; what
    the period spent before it existed counts from the traces that reach it from now on."""
    unknown = set(fields) - set(BUDGET_FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of a budget."})
    budget = Budget(project=project, created_by=actor if isinstance(actor, AbstractBaseUser) else None, **fields)
    _budget_clean(budget)
    budget.save()
    _audit(actor, project, "budgets.budget_created", budget, after=budget.as_dict())
    _budgets_changed(project.pk)
    return budget


@transaction.atomic
def budget_update(*, budget: Budget, actor, **changes) -> Budget:
    budget = Budget.objects.select_for_update().select_related("project").get(pk=budget.pk)
    _budgets_changed(budget.project_id)
    return update_audited(budget, changes, BUDGET_FIELDS, lambda: _budget_clean(budget), actor, "budgets.budget_updated")


@transaction.atomic
def budget_delete(*, budget: Budget, actor) -> None:
    _audit(actor, budget.project, "budgets.budget_deleted", budget, before=budget.as_dict())
    _budgets_changed(budget.project_id)
    budget.delete()


# --- reservations (the call boundary; per call, not audited) ---------------------------------------


_pricers = TTLCache("BUDGETS_CACHE_SECONDS")


def pricer(project_id: int):
    """The project's pricer as the call boundary uses it (read at most every BUDGETS_CACHE_SECONDS)."""
    from .rollups import pricer_for

    return _pricers.get(project_id, lambda: pricer_for(project_id)[0])


def forget_prices(project_id: int) -> None:
    _pricers.forget(project_id)


def _prices_changed(project_id: int) -> None:
    """The call boundary's cached prices of the project are read afresh (now, and once this commits)."""
    forget_prices(project_id)
    transaction.on_commit(lambda: forget_prices(project_id))


class ModelUnpriced(Exception):
    """A reservation asked by model for a model with no price, in a project that does not admit those."""


def estimate(*, project_id: int, model: str, provider: str, input_tokens: int, max_output_tokens: int,
             now) -> int | None:
    """The most a call can cost (nano-USD), or None when the model has no price."""
    found = pricer(project_id).estimate(model, provider, input_tokens, max_output_tokens, now)
    return None if found is None else found[0]


def reservation_create(*, project_id: int, api_key_id: int, estimated_nanos: int | None = None,
                       input_tokens: int = 0, max_output_tokens: int | None = None, agent: str = "",
                       end_user: str = "", model: str = "", provider: str = "", run_id: str = "",
                       ttl_seconds: int | None = None, now=None) -> ledger.Held:
    """Hold the call's upper bound under every budget that applies (``ledger.reserve``): the estimate
    given, or the model's price of ``input_tokens`` in and ``max_output_tokens`` out. Raises
    ``ledger.BudgetExceeded`` or ``ModelUnpriced``."""
    now = now or timezone.now()
    if estimated_nanos is None:
        estimated_nanos = estimate(project_id=project_id, model=model, provider=provider, input_tokens=input_tokens,
                                   max_output_tokens=max_output_tokens or 0, now=now)
        if estimated_nanos is None:
            allowed = CostSettings.objects.filter(project_id=project_id).values_list("unpriced_reservations",
                                                                                    flat=True).first()
            if not allowed:
                raise ModelUnpriced(f"{provider or '?'}/{model} has no price (add a price override, or let the "
                                    "project admit unpriced reservations)")
            estimated_nanos = 0
    return ledger.reserve(project_id=project_id, api_key_id=api_key_id, amount=estimated_nanos, agent=agent,
                          end_user=end_user, model=model, provider=provider, run_id=run_id,
                          ttl_seconds=ttl_seconds or settings.BUDGETS_RESERVATION_TTL_SECONDS, now=now)


def reservation_settle(*, reservation: Reservation, cost_nanos: int | None = None, usage: dict | None = None,
                       now=None) -> Reservation:
    """Charge what the call cost: ``cost_nanos`` as given, or its usage priced as the costs price a
    span (the project's override, else genai-prices; an unpriced model charges its whole hold)."""
    now = now or timezone.now()
    if reservation.state == Reservation.State.SETTLED:
        return reservation  # answered as the first settle was
    if cost_nanos is None:
        cost_nanos = price_call(project_id=reservation.project_id, model=reservation.model,
                                provider=reservation.provider, usage=usage or {}, when=reservation.created_at)
        if cost_nanos is None:
            cost_nanos = reservation.estimate_nanos
    return ledger.settle(reservation, actual=cost_nanos, usage=usage, now=now)


def reservations_settle(items: list[tuple[Reservation, int | None, dict | None]], *, now=None) -> None:
    """``reservation_settle`` for several calls ((reservation, cost or None, usage) each) in the caller's
    transaction: the ledger's rows they share are written once (``ledger.settle_many``)."""
    now = now or timezone.now()
    todo = []
    for reservation, cost_nanos, usage in items:
        if reservation.state == Reservation.State.SETTLED:
            continue
        if cost_nanos is None:
            cost_nanos = price_call(project_id=reservation.project_id, model=reservation.model,
                                    provider=reservation.provider, usage=usage or {}, when=reservation.created_at)
        todo.append((reservation, reservation.estimate_nanos if cost_nanos is None else cost_nanos, usage))
    ledger.settle_many(todo, now=now)


def reservation_release(*, reservation: Reservation, now=None) -> Reservation:
    return ledger.release(reservation, now=now)


def model_limit(model: str, provider: str) -> int | None:
    """The model's context window from the price database (what a call without max_tokens can at most
    produce), or None."""
    from .pricing import _lookup

    found = _lookup(model, provider)
    return getattr(found[1], "context_window", None) if found else None


def price_call(*, project_id: int, model: str, provider: str, usage: dict, when) -> int | None:
    """What a call of ``model`` with ``usage`` cost (nano-USD) as the costs price a span, or None."""
    priced = pricer(project_id).price({"kind": "llm", "model": model, "provider": provider, "usage": usage,
                           "start_time": when.isoformat(), "end_time": when.isoformat()})
    return None if priced is None else priced.cost_nanos
