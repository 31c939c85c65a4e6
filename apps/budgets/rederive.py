"""Re-derive a project's costs from its spans, and say what had drifted.

For a range of the project's days: every span that started in it is priced again from its effective
form (span + late updates) and compared with its ``SpanCost`` row; then the rollups of those days
are recomputed from the rows and compared with what is stored; then the cost of every run holding
such a span; then the budgets' traced spend of every period holding those days
(``ledger.repair_traced``). Each difference is repaired and counted. It reads the span table, so it
is a repair tool (``manage.py costs_rederive``, the task after a time zone change), never on a read
path.

Each day is repaired in its own transaction. A projection that commits while a day is being
repaired is seen by the next pass; run it again to confirm nothing is left (it then reports zeros).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.db import transaction
from django.db.models import Sum

from apps.projects.models import Project
from apps.traces import services as traces

from . import ledger
from .models import CostDay, CostDayEndUser, CostDayUser, CostHour, SpanCost
from .rollups import (
    _ROW_FIELDS,
    HOUR_MEASURES,
    MEASURES,
    Deltas,
    _as_row,
    covered_by_calls,
    covered_iterations,
    pricer_for,
    span_cost_row,
)

SPANS_PER_CHUNK = 2000


def _bounds(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=tz)
    return start, datetime.combine(day + timedelta(days=1), time.min, tzinfo=tz)


def rederive(project: Project, *, since: date, until: date) -> dict[str, int]:
    """Repair ``since``..``until`` (inclusive, the project's days). Returns the counts of what it repaired."""
    report: Counter = Counter()
    day = since
    while day <= until:
        with transaction.atomic():
            _rederive_day(project, day, report)
        day += timedelta(days=1)
    ledger_rows = ledger.repair_traced(project.pk, since=since, until=until)
    if ledger_rows:
        report["budget_ledger_rows"] += ledger_rows
    return dict(report)


def _rederive_day(project: Project, day: date, report: Counter) -> None:
    pricer, tz = pricer_for(project.pk)
    lo, hi = _bounds(day, tz)
    runs: dict[int, object] = {}
    priced_spans = []
    for run, span_pk, eff in traces.spans_effective_between(project_id=project.pk, start=lo, end=hi,
                                                            chunk=SPANS_PER_CHUNK):
        runs[run.pk] = run
        priced = pricer.price(eff)
        if priced is not None:
            priced_spans.append((run, span_pk, eff, priced))
    covered = covered_iterations((run.pk, eff["span_id"], span_pk, eff) for run, span_pk, eff, _ in priced_spans)
    expected = {span_pk: span_cost_row(project_id=project.pk, run=run, span_pk=span_pk, eff=eff, tz=tz,
                                       priced=covered_by_calls(priced) if span_pk in covered else priced)
                for run, span_pk, eff, priced in priced_spans}
    _repair_rows(project, day, expected, report)
    _repair_rollups(project, day, report)
    _repair_run_costs(list(runs.values()), report)


def _repair_rows(project: Project, day: date, expected: dict[int, dict], report: Counter) -> None:
    stored = {sc.span_pk: sc for sc in SpanCost.objects.filter(project=project, day=day)}
    stored.update({sc.span_pk: sc for sc in SpanCost.objects.filter(span_pk__in=set(expected) - set(stored))})
    fields = [f for f in _ROW_FIELDS if f not in ("project_id", "span_pk")]
    for span_pk, row in expected.items():
        sc = stored.pop(span_pk, None)
        if sc is None:
            SpanCost.objects.create(**row)
            report["span_costs_added"] += 1
        elif _as_row(sc) != row:
            for k, v in row.items():
                setattr(sc, k, v)
            sc.save(update_fields=[*fields, "updated_at"])
            report["span_costs_changed"] += 1
    if stored:  # rows of that day whose span is gone or no longer priced
        SpanCost.objects.filter(pk__in=[sc.pk for sc in stored.values()]).delete()
        report["span_costs_removed"] += len(stored)


def _repair_rollups(project: Project, day: date, report: Counter) -> None:
    deltas = Deltas()
    for sc in SpanCost.objects.filter(project=project, day=day).iterator(chunk_size=SPANS_PER_CHUNK):
        deltas.add(_as_row(sc), +1)
    day_rows, day_user, day_end_user, hour = deltas.rollups()
    for model, want, measures, name in ((CostDay, day_rows, MEASURES, "day_rollups"),
                                        (CostDayUser, day_user, MEASURES, "day_user_rollups"),
                                        (CostDayEndUser, day_end_user, MEASURES, "day_end_user_rollups"),
                                        (CostHour, hour, HOUR_MEASURES, "hour_rollups")):
        have = {tuple(getattr(r, k) for k in model.KEY): r for r in model.objects.filter(project=project, day=day)}
        for key, values in want.items():
            row = have.pop(key, None)
            current = [getattr(row, m) for m in measures] if row is not None else [0] * len(measures)
            if current != values:
                if row is None:
                    model.objects.create(**dict(zip(model.KEY, key, strict=True)),
                                         **dict(zip(measures, values, strict=True)))
                else:
                    model.objects.filter(pk=row.pk).update(**dict(zip(measures, values, strict=True)))
                report[name] += 1
        stale = [r.pk for r in have.values() if any(getattr(r, m) for m in measures)]
        if stale:
            report[name] += len(stale)
        model.objects.filter(pk__in=[r.pk for r in have.values()]).delete()


def _repair_run_costs(runs: list, report: Counter) -> None:
    if not runs:
        return
    totals = defaultdict(lambda: None)
    for run_pk, total in (SpanCost.objects.filter(run_id__in=[r.pk for r in runs], cost_nanos__isnull=False)
                          .values("run_id").annotate(total=Sum("cost_nanos")).values_list("run_id", "total")):
        totals[run_pk] = total
    for run in runs:
        want = totals[run.pk]
        have = None if run.cost_usd is None else round(run.cost_usd * 10**9)
        if have != want and not (want is None and have == 0):
            traces.run_cost_set(run_pk=run.pk, cost_nanos=want)
            report["run_costs"] += 1


def default_range(project: Project, days: int) -> tuple[date, date]:
    today = datetime.now(ZoneInfo(project.time_zone)).date()
    return today - timedelta(days=days - 1), today

