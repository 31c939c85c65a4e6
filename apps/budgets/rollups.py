"""Spend kept in step with the run log, inside the projection's transaction.

``on_spans_projected`` receives every span whose effective form a projection changed, and every run
it touched. A span whose pricing inputs changed (model, provider, usage, reported cost, time, end)
is priced again; the difference to its ``SpanCost`` row moves the run's cost and the rollups. A run
whose attribution changed (an agent name that arrived with the root span, after its model calls)
has its rows moved from the old attribution to the new. Everything is written in the projection's
transaction, so spend commits with its spans or not at all, and a re-sent span that changes nothing
is not even seen here.

The rollups are upserts that add (``INSERT … ON CONFLICT … DO UPDATE SET x = x + excluded.x``, the
same on PostgreSQL and SQLite), in key order so that two projections never wait on each other in a
cycle. ``rederive`` rebuilds the rows and rollups of a range of days from the spans and reports what
it repaired.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from zoneinfo import ZoneInfo

from django.db import connection, transaction

from apps.projects.models import Project
from apps.traces.models import Span
from apps.traces.records import parse_time

from .models import CostDay, CostDayEndUser, CostDayUser, CostHour, CostSettings, SpanCost
from .pricing import AGGREGATE_KINDS, LOOP_ITERATION, Priced, Pricer, priced_model
from .pricing import is_model_call as pricing_is_call

logger = logging.getLogger(__name__)

MEASURES = ("cost_nanos", "calls", "unpriced_calls", "input_tokens", "output_tokens", "cache_read_tokens",
            "cache_write_tokens", "reasoning_tokens")
TOKENS = MEASURES[3:]
HOUR_MEASURES = ("cost_nanos", "calls")
ATTRIBUTION = ("agent_name", "agent_version", "end_user", "api_key_id")
_DEFAULT_MARGIN = CostSettings._meta.get_field("disagreement_margin").default


def _pricing_inputs(eff: dict | None) -> tuple | None:
    if eff is None:
        return None
    return (eff.get("kind"), eff.get("model"), eff.get("response_model"), eff.get("provider"),
            tuple(sorted((eff.get("usage") or {}).items())), eff.get("cost_usd"), eff.get("start_time"),
            bool(eff.get("end_time")))


def attribution(run) -> tuple[str, str, str, int]:
    return run.agent_name, run.agent_version, run.end_user, run.api_key_id or 0


def pricer_for(project_id: int) -> tuple[Pricer, ZoneInfo]:
    tz_name, margin = (Project.objects.filter(pk=project_id)
                       .values_list("time_zone", "cost_settings__disagreement_margin").get())
    tz = ZoneInfo(tz_name)
    return Pricer(project_id, tz, margin if margin is not None else _DEFAULT_MARGIN), tz


def span_cost_row(*, project_id: int, run, span_pk: int, eff: dict, priced: Priced, tz: ZoneInfo) -> dict:
    local = parse_time(eff["start_time"]).astimezone(tz)
    usage = eff.get("usage") or {}
    agent, version, end_user, key = attribution(run)
    return {
        "project_id": project_id, "run_id": run.pk, "span_pk": span_pk, "span_id": eff["span_id"],
        "day": local.date(), "hour": local.hour, "kind": eff.get("kind", ""), "agent_name": agent, "agent_version": version,
        "end_user": end_user, "api_key_id": key, "model": priced_model(eff)[:200],
        "provider": (eff.get("provider") or "")[:100],
        **{k: int(usage.get(k) or 0) for k in TOKENS},
        "source": priced.source, "cost_nanos": priced.cost_nanos, "computed_nanos": priced.computed_nanos,
        "reported_nanos": priced.reported_nanos, "price_ref": priced.price_ref[:300],
        "disagreement": priced.disagreement,
    }


class Deltas:
    """What a set of span-cost rows adds to (sign +1) or takes from (-1) each rollup row."""

    def __init__(self) -> None:
        self.day: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
        self.day_user: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
        self.day_end_user: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
        self.hour: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(HOUR_MEASURES))

    def add(self, row: dict, sign: int) -> None:
        priced = row["cost_nanos"] is not None
        values = (sign * (row["cost_nanos"] or 0), sign * priced, sign * (not priced),
                  *(sign * row[k] for k in TOKENS))
        p, d = row["project_id"], row["day"]
        for table, key in ((self.day, (p, d, row["agent_name"], row["agent_version"], row["api_key_id"],
                                       row["model"], row["provider"])),
                           (self.day_user, (p, d, row["end_user"], row["agent_name"], row["agent_version"],
                                            row["api_key_id"], row["model"], row["provider"])),
                           (self.day_end_user, (p, d, row["end_user"]))):
            acc = table[key]
            for i, v in enumerate(values):
                acc[i] += v
        for scope, value in ((CostHour.Scope.PROJECT, ""), (CostHour.Scope.AGENT, row["agent_name"]),
                             (CostHour.Scope.END_USER, row["end_user"])):
            if scope != CostHour.Scope.PROJECT and not value:
                continue
            acc = self.hour[(p, d, row["hour"], scope, value)]
            acc[0] += values[0]
            acc[1] += values[1]

    def write(self) -> None:
        _upsert(CostDay, CostDay.KEY, MEASURES, self.day)
        _upsert(CostDayUser, CostDayUser.KEY, MEASURES, self.day_user)
        _upsert(CostDayEndUser, CostDayEndUser.KEY, MEASURES, self.day_end_user)
        _upsert(CostHour, CostHour.KEY, HOUR_MEASURES, self.hour)


def _upsert(model, key_cols: tuple[str, ...], measures: tuple[str, ...], deltas: dict[tuple, list[int]],
            chunk: int = 500) -> None:
    rows = sorted((k, v) for k, v in deltas.items() if any(v))  # key order: no lock cycles between projections
    if not rows:
        return
    q = connection.ops.quote_name
    table = q(model._meta.db_table)
    cols = [*key_cols, *measures]
    conflict = ", ".join(q(model._meta.get_field(c.removesuffix("_id") if c == "project_id" else c).column)
                         for c in key_cols)
    sets = ", ".join(f"{q(m)} = {table}.{q(m)} + excluded.{q(m)}" for m in measures)
    with connection.cursor() as cur:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            values = ", ".join(["(" + ", ".join(["%s"] * len(cols)) + ")"] * len(part))
            params = [x for key, vals in part for x in (*key, *vals)]
            cur.execute(f"INSERT INTO {table} ({', '.join(q(c) for c in cols)}) VALUES {values} "
                        f"ON CONFLICT ({conflict}) DO UPDATE SET {sets}", params)


_ROW_FIELDS = ("project_id", "run_id", "span_pk", "span_id", "day", "hour", "kind", "agent_name", "agent_version",
               "end_user", "api_key_id", "model", "provider", *TOKENS, "source", "cost_nanos", "computed_nanos",
               "reported_nanos", "price_ref", "disagreement")


def _as_row(sc: SpanCost) -> dict:
    return {f: getattr(sc, f) for f in _ROW_FIELDS}


def on_spans_projected(sender, *, project_id: int, changes, runs=(), **kwargs) -> None:
    """The ``traces.signals.spans_projected`` receiver (inside the projection's transaction)."""
    todo = [c for c in changes if _pricing_inputs(c.before) != _pricing_inputs(c.after)]
    if not todo and not runs:
        return
    deltas = Deltas()
    existing = {sc.span_pk: sc for sc in SpanCost.objects.filter(
        span_pk__in=[c.span_pk for c in todo if c.before is not None])} if todo else {}
    moved = _move_attribution(project_id, runs, deltas, existing)
    if todo:
        pricer, tz = pricer_for(project_id)
        new_rows: list[SpanCost] = []
        changed: list[SpanCost] = []
        gone: list[int] = []
        covered = covered_iterations((c.run.pk, c.span_id, c.span_pk, c.after) for c in todo)
        for c in todo:
            priced = pricer.price(c.after)
            if priced is not None and c.span_pk in covered:
                priced = covered_by_calls(priced)
            old = existing.get(c.span_pk)
            if old is not None:
                deltas.add(_as_row(old), -1)
                c.run.add_cost(-(old.cost_nanos or 0))
            if priced is None:
                if old is not None:
                    gone.append(old.pk)
                continue
            row = span_cost_row(project_id=project_id, run=c.run, span_pk=c.span_pk, eff=c.after, priced=priced,
                                tz=tz)
            deltas.add(row, +1)
            if row["cost_nanos"] is not None or old is not None:
                c.run.add_cost(row["cost_nanos"] or 0)
            if old is None:
                new_rows.append(SpanCost(**row))
            else:
                for k, v in row.items():
                    setattr(old, k, v)
                changed.append(old)
        if gone:
            SpanCost.objects.filter(pk__in=gone).delete()
        SpanCost.objects.bulk_create(new_rows)
        if changed:
            SpanCost.objects.bulk_update(changed, [f for f in _ROW_FIELDS if f not in ("project_id", "span_pk")])
    if todo:
        _cover_parents(project_id, todo, deltas)
    deltas.write()
    if moved:
        logger.debug("costs: moved %d rows to their run's new attribution", moved)


def covered_by_calls(priced: Priced) -> Priced:
    """A loop iteration's reported cost when its model calls are priced themselves: kept, not counted."""
    return Priced(priced.source, 0, priced.computed_nanos, priced.reported_nanos,
                  "covered by its model calls (not counted twice)", False)


def _is_call_row(span: Span) -> bool:
    return span.kind not in AGGREGATE_KINDS and span.kind != LOOP_ITERATION and bool(
        span.request_model or span.response_model or span.input_tokens is not None or span.cost_usd is not None)


def covered_iterations(spans: Iterable[tuple[int, str, int, dict]]) -> set[int]:
    """Of these spans (run pk, span id, span pk, effective form), the loop iterations with a reported
    cost and a model call among their children: such an iteration's cost is its calls' total, which
    are priced themselves (one query, only when such an iteration is among them)."""
    iterations = {(run_pk, span_id): span_pk for run_pk, span_id, span_pk, eff in spans
                  if eff.get("kind") == LOOP_ITERATION and eff.get("cost_usd") is not None}
    if not iterations:
        return set()
    found = set()
    for child in Span.objects.filter(run_id__in={r for r, _ in iterations},
                                     parent_span_id__in={s for _, s in iterations}):
        if _is_call_row(child) and (child.run_id, child.parent_span_id) in iterations:
            found.add(iterations[(child.run_id, child.parent_span_id)])
    return found


def _cover_parents(project_id: int, todo, deltas: Deltas) -> None:
    """A model call arriving under a loop iteration whose reported cost was counted: the iteration's
    cost is now its calls' (count it no more)."""
    parents = {(c.run.pk, c.after.get("parent_span_id")): c.run for c in todo
               if c.after.get("parent_span_id") and pricing_is_call(c.after)}
    if not parents:
        return
    for sc in SpanCost.objects.filter(project_id=project_id, run_id__in={r for r, _ in parents}, kind=LOOP_ITERATION,
                                      span_id__in={s for _, s in parents}, cost_nanos__gt=0):
        run = parents.get((sc.run_id, sc.span_id))
        if run is None:
            continue
        deltas.add(_as_row(sc), -1)
        run.add_cost(-sc.cost_nanos)
        sc.cost_nanos, sc.price_ref, sc.disagreement = 0, "covered by its model calls (not counted twice)", False
        deltas.add(_as_row(sc), +1)
        sc.save(update_fields=["cost_nanos", "price_ref", "disagreement", "updated_at"])


def _move_attribution(project_id: int, runs: Iterable, deltas: Deltas, existing: dict[int, SpanCost]) -> int:
    """Rows rolled up under a run's old agent, version, end user or key: move them to the run's
    current ones (the rows about to be repriced are moved by their repricing)."""
    runs = {r.pk: r for r in runs}
    if not runs:
        return 0
    stale = set()
    for run_pk, *attr in (SpanCost.objects.filter(run_id__in=list(runs)).order_by()
                          .values_list("run_id", *ATTRIBUTION).distinct()):
        if tuple(attr) != attribution(runs[run_pk]):
            stale.add(run_pk)
    moved = 0
    for sc in SpanCost.objects.filter(run_id__in=stale):
        new = attribution(runs[sc.run_id])
        if (sc.agent_name, sc.agent_version, sc.end_user, sc.api_key_id) == new:
            continue
        if sc.span_pk in existing:  # repriced below from its old row: update that row's attribution first
            sc = existing[sc.span_pk]
        deltas.add(_as_row(sc), -1)
        sc.agent_name, sc.agent_version, sc.end_user, sc.api_key_id = new
        deltas.add(_as_row(sc), +1)
        if sc.span_pk not in existing:
            sc.save(update_fields=[*ATTRIBUTION, "updated_at"])
        moved += 1
    return moved


def on_project_updated(sender, *, project, changed, **kwargs) -> None:
    """A new time zone moves every call's day and hour: re-derive the project's costs after commit."""
    if "time_zone" in changed:
        from .tasks import costs_rederive

        transaction.on_commit(lambda: costs_rederive.delay(project.pk))
