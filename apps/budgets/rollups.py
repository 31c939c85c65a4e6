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

from apps.common.bulk import insert_rows
from apps.projects.models import Project
from apps.traces.models import Span
from apps.traces.records import parse_time

from .ledger import add_traced
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
            bool(eff.get("end_time")), reservation_of(eff))


RESERVATION_ATTRIBUTE = "controlplane.reservation_id"


def reservation_of(eff: dict) -> int:
    """The reservation a call was made under (its span's ``controlplane.reservation_id``), or 0."""
    attributes = eff.get("attributes")
    if not attributes:
        return 0
    value = attributes.get(RESERVATION_ATTRIBUTE)
    try:
        return int(value) if value is not None and 0 < int(value) < 2**63 else 0
    except (TypeError, ValueError):
        return 0


def pricer_for(project_id: int) -> tuple[Pricer, ZoneInfo]:
    tz_name, margin = (Project.objects.filter(pk=project_id)
                       .values_list("time_zone", "cost_settings__disagreement_margin").get())
    tz = ZoneInfo(tz_name)
    return Pricer(project_id, tz, margin if margin is not None else _DEFAULT_MARGIN), tz


_NO_USAGE: dict = {}


def span_cost_row(*, project_id: int, run, span_pk: int, eff: dict, priced: Priced, tz: ZoneInfo) -> dict:
    local = parse_time(eff["start_time"]).astimezone(tz)
    usage = eff.get("usage") or _NO_USAGE
    return {
        "project_id": project_id, "run_id": run.pk, "span_pk": span_pk, "span_id": eff["span_id"],
        "day": local.date(), "hour": local.hour, "kind": eff.get("kind", ""), "agent_name": run.agent_name,
        "agent_version": run.agent_version, "end_user": run.end_user, "api_key_id": run.api_key_id or 0,
        "model": priced_model(eff)[:200], "provider": (eff.get("provider") or "")[:100],
        "input_tokens": usage.get("input_tokens") or 0, "output_tokens": usage.get("output_tokens") or 0,
        "cache_read_tokens": usage.get("cache_read_tokens") or 0,
        "cache_write_tokens": usage.get("cache_write_tokens") or 0,
        "reasoning_tokens": usage.get("reasoning_tokens") or 0,
        "source": priced.source, "cost_nanos": priced.cost_nanos, "computed_nanos": priced.computed_nanos,
        "reported_nanos": priced.reported_nanos, "price_ref": priced.price_ref[:300],
        "disagreement": priced.disagreement, "reservation_id": reservation_of(eff),
    }


_PROJECT, _AGENT, _END_USER = (str(s) for s in (CostHour.Scope.PROJECT, CostHour.Scope.AGENT,
                                                   CostHour.Scope.END_USER))


class Deltas:
    """What a set of span-cost rows adds to (sign +1) or takes from (-1) each rollup row.

    Rows are summed first into one cube keyed by every dimension (a projection's calls share few
    keys), which ``write`` folds into the four rollups."""

    def __init__(self) -> None:
        self.cube: dict[tuple, list[int]] = {}

    def add(self, row: dict, sign: int) -> None:
        cost = row["cost_nanos"]
        key = (row["project_id"], row["day"], row["hour"], row["end_user"], row["agent_name"], row["agent_version"],
               row["api_key_id"], row["model"], row["provider"], row["reservation_id"] != 0)
        acc = self.cube.get(key)
        if acc is None:
            acc = self.cube[key] = [0] * len(MEASURES)
        if cost is None:
            acc[2] += sign
        else:
            acc[0] += sign * cost
            acc[1] += sign
        acc[3] += sign * row["input_tokens"]
        acc[4] += sign * row["output_tokens"]
        acc[5] += sign * row["cache_read_tokens"]
        acc[6] += sign * row["cache_write_tokens"]
        acc[7] += sign * row["reasoning_tokens"]

    def rollups(self) -> tuple[dict, dict, dict, dict]:
        """(day, day by end user, day per end user, hour) deltas: {rollup key: measures}."""
        day: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
        day_user: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
        day_end_user: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(MEASURES))
        hour: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(HOUR_MEASURES))
        for (p, d, h, user, agent, version, key, model, provider, _), values in self.cube.items():
            for acc in (day[(p, d, agent, version, key, model, provider)],
                        day_user[(p, d, user, agent, version, key, model, provider)], day_end_user[(p, d, user)]):
                acc[:] = map(int.__add__, acc, values)
            for scope, value in ((_PROJECT, ""), (_AGENT, agent), (_END_USER, user)):
                if value or scope is _PROJECT:
                    acc = hour[(p, d, h, scope, value)]
                    acc[0] += values[0]
                    acc[1] += values[1]
        return day, day_user, day_end_user, hour

    def unreserved(self) -> dict[tuple, int]:
        """Nano-USD per (project, day, hour, end user, agent, key, model) of the calls made without a
        reservation: what the budgets' ledgers learn from the traces (``ledger.add_traced``)."""
        out: dict[tuple, int] = defaultdict(int)
        for (p, d, h, user, agent, _, key, model, _, reserved), values in self.cube.items():
            if not reserved and values[0]:
                out[(p, d, h, user, agent, key, model)] += values[0]
        return out

    def write(self) -> None:
        day, day_user, day_end_user, hour = self.rollups()
        _upsert(CostDay, CostDay.KEY, MEASURES, day)
        _upsert(CostDayUser, CostDayUser.KEY, MEASURES, day_user)
        _upsert(CostDayEndUser, CostDayEndUser.KEY, MEASURES, day_end_user)
        _upsert(CostHour, CostHour.KEY, HOUR_MEASURES, hour)


def _upsert(model, key_cols: tuple[str, ...], measures: tuple[str, ...], deltas: dict[tuple, list[int]],
            chunk: int = 1000) -> None:
    rows = sorted((k, v) for k, v in deltas.items() if any(v))  # key order: no lock cycles between projections
    if not rows:
        return
    q = connection.ops.quote_name
    table = q(model._meta.db_table)
    fields = [model._meta.get_field(c.removesuffix("_id") if c == "project_id" else c) for c in key_cols]
    cols = ", ".join(q(c) for c in (*key_cols, *measures))
    conflict = ", ".join(q(f.column) for f in fields)
    sets = ", ".join(f"{q(m)} = {table}.{q(m)} + excluded.{q(m)}" for m in measures)
    upsert = f"ON CONFLICT ({conflict}) DO UPDATE SET {sets}"
    with connection.cursor() as cur:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            if connection.vendor == "postgresql":
                # One array per column: a handful of parameters, where a VALUES list of a few hundred
                # rows took psycopg longer to convert than the statement took to run. Sent in binary
                # (``%b``): text arrays are quoted element by element, at about twice the cost.
                types = [*(f.db_type(connection) if f.name != "project" else "bigint" for f in fields),
                         *["bigint"] * len(measures)]
                columns = list(zip(*[(*key, *vals) for key, vals in part], strict=True))
                unnest = ", ".join(f"%b::{t}[]" for t in types)
                cur.execute(f"INSERT INTO {table} ({cols}) SELECT * FROM unnest({unnest}) {upsert}",
                            [list(c) for c in columns])
            else:
                values = ", ".join(["(" + ", ".join(["%s"] * (len(key_cols) + len(measures))) + ")"] * len(part))
                cur.execute(f"INSERT INTO {table} ({cols}) VALUES {values} {upsert}",
                            [x for key, vals in part for x in (*key, *vals)])


_ROW_FIELDS = ("project_id", "run_id", "span_pk", "span_id", "day", "hour", "kind", "agent_name", "agent_version",
               "end_user", "api_key_id", "model", "provider", *TOKENS, "source", "cost_nanos", "computed_nanos",
               "reported_nanos", "price_ref", "disagreement", "reservation_id")


def _as_row(sc: SpanCost) -> dict:
    return {f: getattr(sc, f) for f in _ROW_FIELDS}


def on_spans_projected(sender, *, project_id: int, changes, reattributed=(), at_end=None, **kwargs) -> None:
    """The ``traces.signals.spans_projected`` receiver (inside the projection's transaction). Span
    costs and run costs are written here; the rollups, rows every projection of the project shares,
    last (``at_end``), so that two workers' projections queue on them only for the moment before commit."""
    todo = [c for c in changes if c.before is None or _pricing_inputs(c.before) != _pricing_inputs(c.after)]
    if not todo and not reattributed:
        return
    deltas = Deltas()
    existing = {sc.span_pk: sc for sc in SpanCost.objects.filter(
        span_pk__in=[c.span_pk for c in todo if c.before is not None])} if todo else {}
    moved = _move_attribution(project_id, reattributed, deltas, existing)
    if todo:
        pricer, tz = pricer_for(project_id)
        new_rows: list[dict] = []
        changed: list[SpanCost] = []
        gone: list[int] = []
        cost_moves: dict[int, int] = {}  # run pk -> nano-USD
        runs = {}
        covered = covered_iterations((c.run.pk, c.span_id, c.span_pk, c.after) for c in todo)
        for c in todo:
            priced = pricer.price(c.after)
            if priced is not None and c.span_pk in covered:
                priced = covered_by_calls(priced)
            old = existing.get(c.span_pk)
            if old is not None:
                deltas.add(_as_row(old), -1)
                runs[c.run.pk] = c.run
                cost_moves[c.run.pk] = cost_moves.get(c.run.pk, 0) - (old.cost_nanos or 0)
            if priced is None:
                if old is not None:
                    gone.append(old.pk)
                continue
            row = span_cost_row(project_id=project_id, run=c.run, span_pk=c.span_pk, eff=c.after, priced=priced,
                                tz=tz)
            deltas.add(row, +1)
            if row["cost_nanos"] is not None or old is not None:
                runs[c.run.pk] = c.run
                cost_moves[c.run.pk] = cost_moves.get(c.run.pk, 0) + (row["cost_nanos"] or 0)
            if old is None:
                new_rows.append(row)
            else:
                for k, v in row.items():
                    setattr(old, k, v)
                changed.append(old)
        for run_pk, delta in cost_moves.items():
            runs[run_pk].add_cost(delta)  # once per run: a priced run's cost is set even when the sum is 0
        if gone:
            SpanCost.objects.filter(pk__in=gone).delete()
        insert_rows(SpanCost, new_rows, ids=False)
        if changed:
            SpanCost.objects.bulk_update(changed, [f for f in _ROW_FIELDS if f not in ("project_id", "span_pk")])
    if todo:
        _cover_parents(project_id, todo, deltas)
    def write() -> None:
        deltas.write()
        add_traced(deltas.unreserved())

    if at_end is None:
        write()
    else:
        at_end(write)
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
    # Only runs holding a loop span can hold an iteration (Run.has_loop): most batches ask nothing.
    parents = {(c.run.pk, c.after.get("parent_span_id")): c.run for c in todo
               if c.run.has_loop and c.after.get("parent_span_id") and pricing_is_call(c.after)}
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
        if tuple(attr) != runs[run_pk].attribution:
            stale.add(run_pk)
    moved = 0
    for sc in SpanCost.objects.filter(run_id__in=stale):
        new = runs[sc.run_id].attribution
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
        from .services import forget_prices
        from .tasks import costs_rederive

        transaction.on_commit(lambda: forget_prices(project.pk))

        transaction.on_commit(lambda: costs_rederive.delay(project.pk))
