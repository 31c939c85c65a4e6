"""Every read of costs, given the caller (``visible_to``: the one authorization path). All read the
rollups or the per-span rows, never the span table."""
from __future__ import annotations

import statistics
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db.models import BigIntegerField, Count, F, Max, Q, Sum
from django.db.models.functions import Cast
from django.http import Http404
from django.utils import timezone

from apps.projects.models import ApiKey, Project
from apps.traces import selectors as traces_selectors

from .models import (
    Budget,
    BudgetAlert,
    BudgetLedger,
    CostDay,
    CostDayEndUser,
    CostDayUser,
    CostSpike,
    Reservation,
    SpanCost,
    usd,
    usd_text,
)

# group_by names (the API's) and the rollup columns behind them.
DIMENSIONS = {"project": "project__slug", "day": "day", "agent": "agent_name", "version": "agent_version",
              "end_user": "end_user", "key": "api_key_id", "model": "model", "provider": "provider"}
FILTERS = {"agent": "agent_name", "version": "agent_version", "end_user": "end_user", "key": "api_key_id",
           "model": "model", "provider": "provider"}
SUMS = ("cost_nanos", "calls", "unpriced_calls", "input_tokens", "output_tokens", "cache_read_tokens",
        "cache_write_tokens", "reasoning_tokens")
MAX_ROWS = 10_000
DEFAULT_DAYS = 30


def today_in(tz_name: str) -> date:
    return timezone.now().astimezone(ZoneInfo(tz_name)).date()


def costs(*, principal, project_slug: str | None = None, group_by: list[str] | tuple[str, ...] = ("day",),
          since: date | None = None, until: date | None = None, filters: dict[str, Any] | None = None,
          ) -> dict[str, Any]:
    """Spend over the project days ``since``..``until`` (inclusive; default the last 30 days) grouped by
    ``group_by`` (``DIMENSIONS``) and filtered (``FILTERS``), from the narrowest day rollup that holds
    them: ``CostDay`` unless end users are asked for, ``CostDayEndUser`` for end users alone,
    ``CostDayUser`` for end users with other dimensions (as long as the number of users makes it). Rows
    come by the group's order (day first, then by cost, highest first); at most ``MAX_ROWS``."""
    filters = {k: v for k, v in (filters or {}).items() if v not in (None, "")}
    until = until or timezone.now().date()
    since = since or until - timedelta(days=DEFAULT_DAYS - 1)
    by_user = "end_user" in group_by or "end_user" in filters
    users_only = set(group_by) <= {"project", "day", "end_user"} and set(filters) <= {"end_user"}
    model = (CostDayEndUser if users_only else CostDayUser) if by_user else CostDay
    qs = model.objects.visible_to(principal, project_slug=project_slug).filter(day__gte=since, day__lte=until)
    qs = qs.filter(**{FILTERS[k]: v for k, v in filters.items()})
    columns = [DIMENSIONS[g] for g in group_by]
    # SUM(bigint) is numeric in PostgreSQL: cast back, so the driver builds ints, not Decimals.
    grouped = (qs.values(*columns).annotate(**{f"sum_{m}": Cast(Sum(m), BigIntegerField()) for m in SUMS})
               .filter(Q(sum_calls__gt=0) | Q(sum_unpriced_calls__gt=0)))
    order = (["day"] if "day" in group_by else []) + ["-sum_cost_nanos"] + columns
    rows = list(grouped.order_by(*order)[:MAX_ROWS + 1])
    truncated = len(rows) > MAX_ROWS
    rows = rows[:MAX_ROWS]
    keys = _key_names({r["api_key_id"] for r in rows if r.get("api_key_id")}) if "key" in group_by else {}
    out = []
    total = dict.fromkeys(SUMS, 0)
    for r in rows:
        item: dict[str, Any] = {}
        for g, col in zip(group_by, columns, strict=True):
            item[g] = r[col]
            if g == "key":
                item["key"] = keys.get(r[col]) if r[col] else None
        for m in SUMS:
            total[m] += r[f"sum_{m}"] or 0
        out.append({**item, **_measures({m: r[f"sum_{m}"] or 0 for m in SUMS})})
    return {"currency": "USD", "since": since, "until": until, "group_by": list(group_by), "filters": filters,
            "rows": out, "total": _measures(total), "truncated": truncated}


def _measures(sums: dict[str, int]) -> dict[str, Any]:
    return {"cost_usd": usd(sums["cost_nanos"]), "calls": sums["calls"], "unpriced_calls": sums["unpriced_calls"],
            **{m: sums[m] for m in SUMS[3:]}}


def _key_names(ids: set[int]) -> dict[int, dict]:
    return {k.pk: {"id": k.pk, "name": k.name, "prefix": k.display_prefix}
            for k in ApiKey.objects.filter(pk__in=ids)}


def run_costs(*, principal, run_id: str, project_slug: str | None = None) -> dict[str, Any]:
    """A run's cost: its own (the sum of its spans'), its child runs' beside it (never added in), and
    each priced span with how its price was decided. 404 as ``traces.selectors.run_get``."""
    run = traces_selectors.run_get(principal=principal, run_id=run_id, project_slug=project_slug)
    spans = list(SpanCost.objects.filter(run=run).order_by("day", "hour", "span_pk"))
    children = traces_selectors.child_runs_cost(run)
    return {
        "run_id": run.run_id, "cost_usd": run.cost_usd, "children_cost_usd": children["cost_usd"],
        "child_runs": children["runs"], "unpriced_spans": sum(1 for s in spans if s.cost_nanos is None),
        "disagreements": sum(1 for s in spans if s.disagreement), "spans": [span_cost_out(s) for s in spans],
    }


def span_cost_out(s: SpanCost) -> dict[str, Any]:
    return {"span_id": s.span_id, "model": s.model, "provider": s.provider, "source": s.source,
            "cost_usd": s.cost_usd, "computed_usd": usd(s.computed_nanos), "reported_usd": usd(s.reported_nanos),
            "price_ref": s.price_ref, "disagreement": s.disagreement, "day": s.day, "hour": s.hour}


def span_costs_of_run(run) -> dict[str, SpanCost]:
    """Each priced span of a run (already authorised) by span id: what the run page shows per span."""
    return {s.span_id: s for s in SpanCost.objects.filter(run=run)}


def span_cost_of(run, span_id: str) -> SpanCost | None:
    """One span's priced row (run already authorised), or None: what the run page's span panel shows."""
    return SpanCost.objects.filter(run=run, span_id=span_id).first()


def unpriced(*, principal, project_slug: str | None = None, since: date | None = None) -> list[dict[str, Any]]:
    """Unpriced calls by project, model and provider: how many, when last, why (one example), so an
    admin can add a price override. From the partial index on unpriced rows."""
    qs = SpanCost.objects.visible_to(principal, project_slug=project_slug).filter(source="unpriced")
    if since:
        qs = qs.filter(day__gte=since)
    return [{"project": r["project__slug"], "model": r["model"], "provider": r["provider"], "calls": r["calls"],
             "last_day": r["last_day"], "reason": r["reason"]}
            for r in qs.values("project__slug", "model", "provider")
            .annotate(calls=Count("span_pk"), last_day=Max("day"), reason=Max("price_ref"))
            .order_by("-calls", "model")[:200]]


def spikes(*, principal, project_slug: str | None = None, since: date | None = None, limit: int = 100):
    qs = CostSpike.objects.visible_to(principal, project_slug=project_slug).select_related("project")
    if since:
        qs = qs.filter(day__gte=since)
    return list(qs.order_by("-day", F("hour").desc(nulls_last=True), "-id")[:limit])


def spend_by_day(*, principal, project_slug: str | None, since: date, until: date) -> dict[date, int]:
    """Nano-USD per day (all visible projects, or one) from the day rollups."""
    qs = CostDay.objects.visible_to(principal, project_slug=project_slug).filter(day__gte=since, day__lte=until)
    return dict(qs.values("day").annotate(c=Sum("cost_nanos")).values_list("day", "c"))


def spend_today(*, principal, project_slug: str | None = None, baseline_days: int = 7) -> dict[str, Any]:
    """Today's spend against yesterday's and the trailing average of the days before today (the
    overview's tile). "Today" is the UTC day across projects; with one project, that project's."""
    tz = "UTC"
    if project_slug:
        tz = Project.objects.visible_to(principal, project_slug=project_slug).values_list(
            "time_zone", flat=True).first() or "UTC"
    today = today_in(tz)
    by_day = spend_by_day(principal=principal, project_slug=project_slug, since=today - timedelta(days=baseline_days),
                          until=today)
    past = [by_day.get(today - timedelta(days=i), 0) for i in range(1, baseline_days + 1)]
    return {"today": today, "today_usd": usd(by_day.get(today, 0)), "yesterday_usd": usd(past[0]),
            "trailing_avg_usd": usd(int(statistics.fmean(past))) if past else None,
            "days": [(today - timedelta(days=i), usd(by_day.get(today - timedelta(days=i), 0)))
                     for i in range(baseline_days, -1, -1)]}


def agent_costs(*, principal, project_slug: str | None, since: datetime, until: datetime | None = None
                ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Spend per (project slug, agent, version) over the days of the window (UTC days), for the agents page."""
    until_day = (until or timezone.now()).date()
    qs = CostDay.objects.visible_to(principal, project_slug=project_slug).filter(day__gte=since.date(),
                                                                                 day__lte=until_day)
    return {(r["project__slug"], r["agent_name"], r["agent_version"]):
            {"cost_usd": usd(r["c"]), "calls": r["n"], "unpriced_calls": r["u"]}
            for r in qs.values("project__slug", "agent_name", "agent_version")
            .annotate(c=Sum("cost_nanos"), n=Sum("calls"), u=Sum("unpriced_calls"))}


# --- budgets and reservations ---------------------------------------------------------------------


def _periods(budgets: list[Budget], *, now: datetime) -> dict[int, tuple]:
    """Each budget's period in force: {id: (Applicable, period start, ledger row or None)} (one query)."""
    from .ledger import Applicable, _zone

    applicable = {b.pk: Applicable(b.pk, b.project_id, b.name, b.scope, b.value, b.period, b.cap_nanos, b.hard,
                                   _zone(b.time_zone or b.project.time_zone), tuple(b.thresholds or ()),
                                   _zone(b.project.time_zone))
                  for b in budgets}
    starts = {pk: a.period_of(now) for pk, a in applicable.items()}
    rows = ({(r.budget_id, r.period_start): r for r in BudgetLedger.objects.filter(
        budget_id__in=list(applicable), period_start__in=set(starts.values()))} if applicable else {})
    return {pk: (a, starts[pk], rows.get((pk, starts[pk]))) for pk, a in applicable.items()}


def budgets_current(budgets: list[Budget], *, now: datetime | None = None) -> dict[int, dict]:
    """Each budget's period in force: spent, held, remaining, when it resets (one query)."""
    out = {}
    for pk, (a, start, row) in _periods(budgets, now=now or timezone.now()).items():
        out[pk] = a.as_out(start=start, charged=row.charged_nanos if row else 0,
                           traced=row.traced_nanos if row else 0, held=row.held_nanos if row else 0)
    return out


NEAR_FRACTION = Decimal("0.8")  # a budget with no thresholds is "near" its cap from 80 % on


def budget_board(*, principal, project_slug: str | None = None, now: datetime | None = None) -> list[dict[str, Any]]:
    """The enabled budgets the caller may see, each with its period in force: cap, spent (charged and
    traced), held now, what is left, the share used (spent and held over the cap), when it resets, the
    thresholds crossed in the period and ``level`` (``over``, ``near`` or ``ok``). Most used first.
    Three queries, whatever the number of budgets."""
    now = now or timezone.now()
    budgets = list(Budget.objects.visible_to(principal, project_slug=project_slug).filter(enabled=True)
                   .select_related("project"))
    periods = _periods(budgets, now=now)
    crossed: dict[tuple[int, date], list[int]] = {}
    if budgets:
        for budget_id, start, threshold in (BudgetAlert.objects.filter(
                budget_id__in=[b.pk for b in budgets], period_start__in={p[1] for p in periods.values()})
                .order_by("threshold").values_list("budget_id", "period_start", "threshold")):
            crossed.setdefault((budget_id, start), []).append(threshold)
    out = []
    for b in budgets:
        a, start, row = periods[b.pk]
        spent = (row.charged_nanos + row.traced_nanos) if row else 0
        held = row.held_nanos if row else 0
        share = Decimal(spent + held) / b.cap_nanos if b.cap_nanos else (Decimal(1) if spent + held else Decimal(0))
        near = min(b.thresholds) / Decimal(100) if b.thresholds else NEAR_FRACTION
        out.append({
            "budget": b, "project": b.project.slug, "period_start": start,
            "resets_at": resets_at_of(a, start), "cap_usd": usd(b.cap_nanos), "spent_usd": usd(spent),
            "held_usd": usd(held), "remaining_usd": usd(max(b.cap_nanos - spent - held, 0)),
            "reservations": row.reservations if row else 0, "share": share, "percent": min(int(share * 100), 999),
            "crossed": crossed.get((b.pk, start), []), "bar": _bar(spent, held, b.cap_nanos),
            "level": "over" if share >= 1 else "near" if share >= near else "ok"})
    out.sort(key=lambda r: (-r["share"], r["project"], r["budget"].name))
    return out


def _bar(spent: int, held: int, cap: int) -> dict[str, float]:
    """The use bar's two segments in percent of the cap (together at most 100)."""
    if cap <= 0:
        return {"spent": 100.0 if spent else 0.0, "held": 0.0 if spent or not held else 100.0}
    s = min(spent * 100 / cap, 100.0)
    return {"spent": round(s, 1), "held": round(min(held * 100 / cap, 100.0 - s), 1)}


def resets_at_of(a, start: date) -> datetime:
    from .ledger import resets_at

    return resets_at(a.period, start, a.tz)


def reservations_held(*, principal, project_slug: str | None = None, limit: int = 20) -> dict[str, Any]:
    """The reservations held now (oldest first: the ones nearest their expiry), how many and how much."""
    qs = Reservation.objects.visible_to(principal, project_slug=project_slug).filter(state=Reservation.State.HELD)
    totals = qs.aggregate(n=Count("id"), s=Sum("estimate_nanos"))
    return {"rows": list(qs.select_related("project").order_by("created_at", "id")[:limit]), "count": totals["n"],
            "held_usd": usd(totals["s"] or 0)}


def budget_alerts(*, principal, project_slug: str | None = None, since: datetime | None = None,
                  limit: int = 50) -> list[BudgetAlert]:
    """Thresholds crossed (newest first)."""
    qs = BudgetAlert.objects.visible_to(principal, project_slug=project_slug).select_related("project", "budget")
    if since:
        qs = qs.filter(created_at__gte=since)
    return list(qs.order_by("-created_at", "-id")[:limit])


RUN_RESERVATIONS = 50


def reservations_of_run(run) -> dict[str, Any]:
    """A run's reservations and refusals (run already authorised): the first ``RUN_RESERVATIONS`` in
    the order they were made, how many there were and how many were refused."""
    qs = Reservation.objects.filter(project_id=run.project_id, run_id=run.run_id)
    totals = qs.aggregate(n=Count("id"), refused=Count("id", filter=Q(state=Reservation.State.REFUSED)))
    rows = list(qs.select_related("refused_by").order_by("created_at", "id")[:RUN_RESERVATIONS]) if totals["n"] else []
    return {"rows": rows, "count": totals["n"], "refused": totals["refused"]}


def budgets_of_project(project: Project) -> list[Budget]:
    return list(Budget.objects.filter(project=project).select_related("project").order_by("name"))


def reservation(*, principal, reservation_id: int) -> Reservation:
    """One reservation the caller may see (a key: its project's), else 404."""
    found = Reservation.objects.visible_to(principal).filter(pk=reservation_id).first()
    if found is None:
        raise Http404
    return found


def reservation_out(r: Reservation, budgets: list[dict] | None = None) -> dict[str, Any]:
    return {"id": r.pk, "state": r.state, "held_usd": usd_text(r.estimate_nanos),
            "charged_usd": None if r.charged_nanos is None else usd_text(r.charged_nanos), "agent": r.agent_name,
            "end_user": r.end_user, "model": r.model, "provider": r.provider, "run_id": r.run_id,
            "created_at": r.created_at, "expires_at": r.expires_at, "closed_at": r.closed_at,
            **({"budgets": budgets} if budgets is not None else {})}
