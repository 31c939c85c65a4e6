"""Daily and monthly caps: reservations held against budgets before a paid call, settled after it.

A budget's period (its day or month, in the budget's time zone) has one ``BudgetLedger`` row:
charged (settled reservations), traced (spend that arrived through traces without a reservation)
and held (reservations not settled yet). Reserving is **one conditional upsert**: of the ledger rows
of every budget that applies, creating a period's row on its first use, whose update runs only where
``charged + traced + held + this <= cap`` (``INSERT … ON CONFLICT … DO UPDATE … WHERE … RETURNING``,
on PostgreSQL and SQLite alike). The database serialises the updates of one row, so two calls can
never both take the last dollar; a budget whose row did not come back refused the call, and the
transaction (and any hold taken on another budget) is rolled back. On PostgreSQL the upsert and the
reservation's row are one statement in its own transaction (``_hold_in_one``: one round trip, no
BEGIN or COMMIT of ours). Nothing else is locked: no audit chain (a reservation is the run log's,
not a change), no row but the ledger's.

Settling, releasing and expiring move a reservation out of ``held`` with a conditional update of its
own row (``WHERE state = 'held'``): whatever the concurrency, each happens once; a repeated settle
answers what the first did. An expired reservation was charged in full; a later settle charges the
difference (once), a later release refunds it.

The period a reservation counts in is the one in force when it was made: nothing resets at midnight,
the next period simply has a row of its own. Spend from traces (``add_traced``, called by the
projection) counts in the period of the call's hour.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from contextlib import nullcontext as _nothing
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from apps.common.ttl import TTLCache

from .models import Budget, BudgetAlert, BudgetLedger, Reservation, usd_text

logger = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 600
MAX_TTL_SECONDS = 24 * 3600


# --- periods --------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def period_start(period: str, local_day: date) -> date:
    return local_day.replace(day=1) if period == Budget.Period.MONTH else local_day


def period_end(period: str, start: date) -> date:
    """The first day of the next period."""
    if period == Budget.Period.MONTH:
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return start + timedelta(days=1)


def resets_at(period: str, start: date, tz: ZoneInfo) -> datetime:
    """When the period that began on ``start`` ends (the next one's midnight, in the budget's zone)."""
    return datetime.combine(period_end(period, start), time(0), tzinfo=tz).astimezone(ZoneInfo("UTC"))


@dataclass(frozen=True)
class Applicable:
    """A budget as the ledger uses it (read once per call)."""

    id: int
    project_id: int
    name: str
    scope: str
    value: str
    period: str
    cap_nanos: int
    hard: bool
    tz: ZoneInfo
    thresholds: tuple[int, ...]
    project_tz: ZoneInfo

    def period_of(self, moment: datetime) -> date:
        return period_start(self.period, moment.astimezone(self.tz).date())

    def as_out(self, *, start: date, charged: int, traced: int, held: int) -> dict:
        spent = charged + traced
        return {"id": self.id, "name": self.name, "scope": self.scope, "value": self.value, "period": self.period,
                "hard": self.hard, "period_start": start.isoformat(),
                "resets_at": resets_at(self.period, start, self.tz).isoformat(),
                "cap_usd": usd_text(self.cap_nanos), "spent_usd": usd_text(spent), "held_usd": usd_text(held),
                "remaining_usd": usd_text(max(self.cap_nanos - spent - held, 0))}


_BUDGET_COLUMNS = ("id", "project_id", "name", "scope", "value", "period", "cap_nanos", "hard", "time_zone",
                   "thresholds", "project__time_zone")


def _applicable(rows: Iterable[tuple]) -> list[Applicable]:
    return [Applicable(pk, project_id, name, scope, value, period, cap, hard, _zone(tz or project_tz),
                       tuple(thresholds or ()), _zone(project_tz))
            for pk, project_id, name, scope, value, period, cap, hard, tz, thresholds, project_tz in rows]


_budgets = TTLCache("BUDGETS_CACHE_SECONDS")


def budgets_of(project_ids: Iterable[int]) -> list[Applicable]:
    """The enabled budgets of these projects (each project's read at most every BUDGETS_CACHE_SECONDS)."""
    out: list[Applicable] = []
    for project_id in project_ids:
        out.extend(_budgets.get(project_id, lambda p=project_id: _applicable(
            Budget.objects.filter(project_id=p, enabled=True).order_by("id").values_list(*_BUDGET_COLUMNS))))
    return out


def forget_budgets(project_id: int) -> None:
    """A budget of the project changed (in this process): read them afresh."""
    _budgets.forget(project_id)


def matches(b: Applicable, *, agent: str, end_user: str, model: str, api_key_id: int) -> bool:
    scope = b.scope
    return (scope == Budget.Scope.PROJECT or (scope == Budget.Scope.AGENT and b.value == agent)
            or (scope == Budget.Scope.END_USER and b.value == end_user)
            or (scope == Budget.Scope.MODEL and b.value == model)
            or (scope == Budget.Scope.API_KEY and b.value == str(api_key_id)))


# --- reserving ------------------------------------------------------------------------------------


class BudgetExceeded(Exception):
    """A hard budget would pass its cap: ``refusals`` names each (with its use), ``reservation`` is
    the refused reservation's row (kept: the run page shows refusals)."""

    def __init__(self, refusals: list[dict], reservation: Reservation, requested: int) -> None:
        super().__init__(f"budget '{refusals[0]['name']}' would pass its cap")
        self.refusals = refusals
        self.reservation = reservation
        self.requested = requested


@dataclass
class Held:
    reservation: Reservation
    budgets: list[dict]


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


_LEDGER = BudgetLedger._meta.db_table


def _hold(rows: list[tuple[Applicable, date]], amount: int) -> dict[int, tuple]:
    """Take ``amount`` on each (budget, period) row where it fits (a hard budget) or anyway (a soft
    one): {budget id: (ledger id, charged, traced, held)} of the rows taken."""
    t = _q(_LEDGER)
    values = ", ".join(["(%s, %s, %s, %s, %s, 0, 0, %s, 1)"] * len(rows))
    params = [x for b, start in rows for x in (b.project_id, b.id, start, b.cap_nanos, b.hard, amount)]
    sql = (f"INSERT INTO {t} (project_id, budget_id, period_start, cap_nanos, hard, charged_nanos, traced_nanos, "
           f"held_nanos, reservations) VALUES {values} "
           f"ON CONFLICT (budget_id, period_start) DO UPDATE SET held_nanos = {t}.held_nanos + excluded.held_nanos, "
           f"reservations = {t}.reservations + 1, cap_nanos = excluded.cap_nanos, hard = excluded.hard "
           f"WHERE NOT excluded.hard OR {t}.charged_nanos + {t}.traced_nanos + {t}.held_nanos + excluded.held_nanos "
           f"<= excluded.cap_nanos "
           f"RETURNING id, budget_id, charged_nanos, traced_nanos, held_nanos")
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return {budget_id: (pk, charged, traced, held) for pk, budget_id, charged, traced, held in cur.fetchall()}


def reserve(*, project_id: int, api_key_id: int, amount: int, agent: str = "", end_user: str = "", model: str = "",
            provider: str = "", run_id: str = "", ttl_seconds: int = DEFAULT_TTL_SECONDS,
            now: datetime | None = None) -> Held:
    """Hold ``amount`` nano-USD under every budget of the project that applies to the call, or raise
    ``BudgetExceeded`` holding nothing. No budget applies: the reservation is kept all the same (it
    settles as any other), holding on no row."""
    now = now or timezone.now()
    budgets = [b for b in budgets_of([project_id])
               if matches(b, agent=agent, end_user=end_user, model=model, api_key_id=api_key_id)]
    rows = sorted(((b, b.period_of(now)) for b in budgets), key=lambda r: (r[0].id, r[1]))
    fields = {"project_id": project_id, "api_key_id": api_key_id, "agent_name": agent, "end_user": end_user,
              "model": model, "provider": provider, "run_id": run_id, "estimate_nanos": amount, "created_at": now,
              "expires_at": now + timedelta(seconds=ttl_seconds)}
    taken: dict[int, tuple] = {}
    # A hard cap below the amount refuses it even in a period with no row yet (the insert takes no check).
    over = {b.id for b, _ in rows if b.hard and amount > b.cap_nanos}
    if not over and rows and connection.vendor == "postgresql":
        held = _hold_in_one(rows, amount, fields)
        if held is not None:
            return held
    elif not over:
        with transaction.atomic():
            taken = _hold(rows, amount) if rows else {}
            refused = [b for b, _ in rows if b.id not in taken]
            if not refused:
                reservation = Reservation.objects.create(state=Reservation.State.HELD,
                                                         ledger_ids=sorted(v[0] for v in taken.values()), **fields)
                return Held(reservation, [b.as_out(start=start, charged=taken[b.id][1], traced=taken[b.id][2],
                                                   held=taken[b.id][3]) for b, start in rows])
            transaction.set_rollback(True)
    if over:
        refusals = _refusals([(b, start) for b, start in rows if b.id in over])
    elif taken:
        refusals = _refusals([(b, start) for b, start in rows if b.id not in taken])
    else:  # the holds were undone whole (one statement): the hard budgets this amount does not fit now
        refusals = _refusals([(b, start) for b, start in rows if b.hard], unless_fits=amount)
    reservation = Reservation.objects.create(state=Reservation.State.REFUSED, closed_at=now,
                                             refused_by_id=refusals[0]["id"], **fields)
    raise BudgetExceeded(refusals, reservation, amount)


_RESERVATION = Reservation._meta.db_table
_RESERVATION_COLUMNS = ("project_id", "api_key_id", "agent_name", "end_user", "model", "provider", "run_id",
                        "estimate_nanos", "created_at", "expires_at")


def _hold_in_one(rows: list[tuple[Applicable, date]], amount: int, fields: dict) -> Held | None:
    """PostgreSQL: the holds and the reservation's row in one statement (one round trip, its own
    transaction when none is open). Every row must come back: where one does not (a hard budget
    refused), no reservation row is written and the statement divides by zero, so that it fails whole
    and no hold stays taken; None then (the caller reads the refusals)."""
    t, r = _q(_LEDGER), _q(_RESERVATION)
    values = ", ".join(["(%s, %s, %s, %s, %s, 0, 0, %s, 1)"] * len(rows))
    params = [x for b, start in rows for x in (b.project_id, b.id, start, b.cap_nanos, b.hard, amount)]
    columns = ", ".join(_q(c) for c in _RESERVATION_COLUMNS)
    marks = ", ".join(["%s"] * len(_RESERVATION_COLUMNS))
    params += [fields[c] for c in _RESERVATION_COLUMNS] + [len(rows)]
    sql = (f"WITH h AS (INSERT INTO {t} (project_id, budget_id, period_start, cap_nanos, hard, charged_nanos, "
           f"traced_nanos, held_nanos, reservations) VALUES {values} "
           f"ON CONFLICT (budget_id, period_start) DO UPDATE SET held_nanos = {t}.held_nanos + excluded.held_nanos, "
           f"reservations = {t}.reservations + 1, cap_nanos = excluded.cap_nanos, hard = excluded.hard "
           f"WHERE NOT excluded.hard OR {t}.charged_nanos + {t}.traced_nanos + {t}.held_nanos + excluded.held_nanos "
           f"<= excluded.cap_nanos RETURNING id, budget_id, charged_nanos, traced_nanos, held_nanos), "
           f"n AS (SELECT count(*) AS taken, jsonb_agg(id ORDER BY id) AS ids FROM h), "
           f"r AS (INSERT INTO {r} ({columns}, state, ledger_ids) SELECT {marks}, 'held', n.ids FROM n WHERE n.taken = %s "
           f"RETURNING id) "
           f"SELECT (SELECT id FROM r), 1 / (SELECT count(*) FROM r), "
           f"(SELECT jsonb_agg(jsonb_build_array(id, budget_id, charged_nanos, traced_nanos, held_nanos)) FROM h)")
    try:
        # Inside a caller's transaction a savepoint keeps the refusal's error from failing it; alone, the
        # statement is its own transaction (autocommit: no BEGIN, no COMMIT round trip).
        with transaction.atomic() if connection.in_atomic_block else _nothing():
            with connection.cursor() as cur:
                cur.execute(sql, params)
                reservation_id, _, taken_rows = cur.fetchone()
    except DataError:
        return None
    if isinstance(taken_rows, str):  # Django's psycopg loads JSON as text (its fields decode it)
        taken_rows = json.loads(taken_rows)
    taken = {budget_id: (pk, charged, traced, held) for pk, budget_id, charged, traced, held in taken_rows}
    reservation = Reservation(pk=reservation_id, state=Reservation.State.HELD,
                              ledger_ids=sorted(v[0] for v in taken.values()), **fields)
    reservation._state.adding = False
    return Held(reservation, [b.as_out(start=start, charged=taken[b.id][1], traced=taken[b.id][2],
                                       held=taken[b.id][3]) for b, start in rows])


def _refusals(rows: list[tuple[Applicable, date]], *, unless_fits: int | None = None) -> list[dict]:
    """Each budget's use (as a refusal names it); with ``unless_fits``, only those that amount does not fit
    now (all of them should the room have been freed since: the call was refused all the same)."""
    found = {(budget_id, start): (charged, traced, held) for budget_id, start, charged, traced, held in
             BudgetLedger.objects.filter(budget_id__in=[b.id for b, _ in rows])
             .values_list("budget_id", "period_start", "charged_nanos", "traced_nanos", "held_nanos")}
    out = []
    for b, start in rows:
        charged, traced, held = found.get((b.id, start), (0, 0, 0))
        if unless_fits is None or charged + traced + held + unless_fits > b.cap_nanos:
            out.append(b.as_out(start=start, charged=charged, traced=traced, held=held))
    return out or ([] if unless_fits is None else _refusals(rows))


# --- settling, releasing, expiring ----------------------------------------------------------------


class ReservationClosed(Exception):
    """Settling a released (or refused) reservation, or releasing a settled one."""

    def __init__(self, reservation: Reservation) -> None:
        super().__init__(f"reservation {reservation.pk} is {reservation.state}")
        self.reservation = reservation


def _move(ledger_ids: list[int], *, held: int, charged: int) -> list[tuple]:
    """Add ``held`` and ``charged`` (either may be negative) to ledger rows, in id order (no lock cycles);
    returns each row after: (budget id, period start, charged, traced, cap)."""
    if not ledger_ids or (not held and not charged):
        return []
    t = _q(_LEDGER)
    ids = sorted(ledger_ids)
    marks = ", ".join(["%s"] * len(ids))
    # The rows locked in id order (as a reservation locks them): two calls never wait on each other in a cycle.
    where = (f"id IN (SELECT id FROM {t} WHERE id IN ({marks}) ORDER BY id FOR UPDATE)"
             if connection.vendor == "postgresql" else f"id IN ({marks})")
    with connection.cursor() as cur:
        cur.execute(f"UPDATE {t} SET held_nanos = held_nanos + %s, charged_nanos = charged_nanos + %s WHERE {where} "
                    f"RETURNING budget_id, period_start, charged_nanos, traced_nanos, cap_nanos", [held, charged, *ids])
        return cur.fetchall()


def _transition(reservation: Reservation, from_state: str, to_state: str, **fields) -> bool:
    return bool(Reservation.objects.filter(pk=reservation.pk, state=from_state).update(state=to_state, **fields))


def settle(reservation: Reservation, *, actual: int, usage: dict | None = None,
           now: datetime | None = None) -> Reservation:
    """Charge what the call cost and release the rest of the hold (once: a settled reservation is
    answered as it is). An expired one, charged in full already, is charged the difference."""
    now = now or timezone.now()
    with transaction.atomic(savepoint=False):  # (inside a caller's transaction: no savepoint of its own)
        fields = {"charged_nanos": actual, "usage": usage, "closed_at": now}
        if _transition(reservation, Reservation.State.HELD, Reservation.State.SETTLED, **fields):
            after = _move(reservation.ledger_ids, held=-reservation.estimate_nanos, charged=actual)
            _alert(after, spent_delta=actual, project_id=reservation.project_id)
        elif _transition(reservation, Reservation.State.EXPIRED, Reservation.State.SETTLED, **fields):
            after = _move(reservation.ledger_ids, held=0, charged=actual - reservation.estimate_nanos)
            _alert(after, spent_delta=actual - reservation.estimate_nanos, project_id=reservation.project_id)
        else:
            reservation.refresh_from_db()
            fields = {}
        for name, value in fields.items():
            setattr(reservation, name, value)
        if fields:
            reservation.state = Reservation.State.SETTLED
    if reservation.state != Reservation.State.SETTLED:
        raise ReservationClosed(reservation)
    return reservation


def settle_many(items: list[tuple[Reservation, int, dict | None]], *, now: datetime | None = None) -> None:
    """``settle`` for several held reservations ((reservation, actual, usage) each), in the caller's
    transaction: on PostgreSQL their rows move out of ``held`` in one statement and the ledger's rows
    they hold on take the sum of their changes in one more (locked in id order, from there to the
    commit only). One that was not held any more (expired, released) is settled alone, as ``settle``
    does; a closed one raises ``ReservationClosed``."""
    now = now or timezone.now()
    if connection.vendor != "postgresql" or len(items) < 2:
        for reservation, actual, usage in items:
            settle(reservation, actual=actual, usage=usage, now=now)
        return
    r = _q(_RESERVATION)
    values = ", ".join(["(%s, %s, %s::jsonb)"] * len(items))
    params: list = [now]
    for reservation, actual, usage in items:
        params += [reservation.pk, actual, None if usage is None else json.dumps(usage)]
    with connection.cursor() as cur:
        cur.execute(f"UPDATE {r} SET state = 'settled', charged_nanos = v.actual, usage = v.usage, closed_at = %s "
                    f"FROM (VALUES {values}) AS v (id, actual, usage) WHERE {r}.id = v.id AND {r}.state = 'held' "
                    f"RETURNING {r}.id", params)
        moved = {row[0] for row in cur.fetchall()}
    deltas: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    project_ids = set()
    for reservation, actual, usage in items:
        if reservation.pk not in moved:
            continue
        for ledger_id in reservation.ledger_ids:
            deltas[ledger_id][0] -= reservation.estimate_nanos
            deltas[ledger_id][1] += actual
        project_ids.add(reservation.project_id)
        reservation.state, reservation.charged_nanos = Reservation.State.SETTLED, actual
        reservation.usage, reservation.closed_at = usage, now
    if deltas:
        t = _q(_LEDGER)
        ids = sorted(deltas)
        values = ", ".join(["(%s, %s, %s)"] * len(ids))
        marks = ", ".join(["%s"] * len(ids))
        with connection.cursor() as cur:
            cur.execute(f"UPDATE {t} SET held_nanos = held_nanos + v.held, charged_nanos = charged_nanos + v.charged "
                        f"FROM (VALUES {values}) AS v (id, held, charged) WHERE {t}.id = v.id AND {t}.id IN "
                        f"(SELECT id FROM {t} WHERE id IN ({marks}) ORDER BY id FOR UPDATE) "
                        f"RETURNING {t}.id, budget_id, period_start, charged_nanos, traced_nanos, cap_nanos",
                        [x for i in ids for x in (i, *deltas[i])] + ids)
            after = cur.fetchall()
        budgets = {b.id: b for b in budgets_of(project_ids)}
        for ledger_id, *row in after:
            _alert([tuple(row)], spent_delta=deltas[ledger_id][1], budgets=budgets)
    for reservation, actual, usage in items:
        if reservation.pk not in moved:
            settle(reservation, actual=actual, usage=usage, now=now)


def release(reservation: Reservation, *, now: datetime | None = None) -> Reservation:
    """The call never happened: give the hold back (an expired reservation's charge is refunded)."""
    now = now or timezone.now()
    with transaction.atomic(savepoint=False):
        if _transition(reservation, Reservation.State.HELD, Reservation.State.RELEASED, charged_nanos=0,
                       closed_at=now):
            _move(reservation.ledger_ids, held=-reservation.estimate_nanos, charged=0)
        elif _transition(reservation, Reservation.State.EXPIRED, Reservation.State.RELEASED, charged_nanos=0,
                         closed_at=now):
            _move(reservation.ledger_ids, held=0, charged=-reservation.estimate_nanos)
        reservation.refresh_from_db()
    if reservation.state != Reservation.State.RELEASED:
        raise ReservationClosed(reservation)
    return reservation


def expire(reservation: Reservation, *, now: datetime | None = None) -> bool:
    """A reservation past its time to live, never settled: charge its whole hold (the call may have
    happened). Returns whether it expired now."""
    now = now or timezone.now()
    with transaction.atomic():
        if not _transition(reservation, Reservation.State.HELD, Reservation.State.EXPIRED,
                           charged_nanos=reservation.estimate_nanos, closed_at=now):
            return False
        after = _move(reservation.ledger_ids, held=-reservation.estimate_nanos, charged=reservation.estimate_nanos)
        _alert(after, spent_delta=reservation.estimate_nanos, project_id=reservation.project_id)
    return True


def expire_due(*, now: datetime | None = None, limit: int = 1000) -> int:
    """Beat: expire the held reservations past their time to live (oldest first, ``limit`` a run)."""
    now = now or timezone.now()
    due = list(Reservation.objects.filter(state=Reservation.State.HELD, expires_at__lte=now)
               .order_by("expires_at")[:limit])
    return sum(expire(r, now=now) for r in due)


# --- spend that arrives through traces ------------------------------------------------------------


def add_traced(cells: dict[tuple, int]) -> None:
    """Spend of calls made without a reservation, from the projection (in its transaction): nano-USD per
    (project, day, hour, end user, agent, key id, model), the day and hour in the project's zone.
    Each budget that applies counts it in the period holding that hour."""
    if not cells:
        return
    budgets_by_project: dict[int, list[Applicable]] = defaultdict(list)
    for b in budgets_of({c[0] for c in cells}):
        budgets_by_project[b.project_id].append(b)
    if not budgets_by_project:
        return
    project_tz = {b.project_id: b.project_tz for bs in budgets_by_project.values() for b in bs}
    by_row: dict[tuple[int, date], int] = defaultdict(int)
    budgets: dict[int, Applicable] = {}
    for (project_id, day, hour, end_user, agent, key, model), amount in cells.items():
        for b in budgets_by_project.get(project_id, ()):
            if not matches(b, agent=agent, end_user=end_user, model=model, api_key_id=key):
                continue
            tz = project_tz[project_id]
            if b.tz == tz:
                start = period_start(b.period, day)
            else:
                start = b.period_of(datetime.combine(day, time(hour), tzinfo=tz))
            by_row[(b.id, start)] += amount
            budgets[b.id] = b
    rows_ = sorted((k, v) for k, v in by_row.items() if v)
    if not rows_:
        return
    t = _q(_LEDGER)
    values = ", ".join(["(%s, %s, %s, %s, %s, 0, %s, 0, 0)"] * len(rows_))
    params = [x for (budget_id, start), amount in rows_ for x in (
        budgets[budget_id].project_id, budget_id, start, budgets[budget_id].cap_nanos, budgets[budget_id].hard, amount)]
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {t} (project_id, budget_id, period_start, cap_nanos, hard, charged_nanos, "
                    f"traced_nanos, held_nanos, reservations) VALUES {values} "
                    f"ON CONFLICT (budget_id, period_start) DO UPDATE SET traced_nanos = {t}.traced_nanos + "
                    f"excluded.traced_nanos, cap_nanos = excluded.cap_nanos, hard = excluded.hard "
                    f"RETURNING budget_id, period_start, charged_nanos, traced_nanos, cap_nanos", params)
        after = cur.fetchall()
    deltas = dict(rows_)
    for row in after:
        _alert([row], spent_delta=deltas[(row[0], _as_date(row[1]))], budgets=budgets)


def repair_traced(project_id: int, *, since: date, until: date) -> int:
    """Recount the traced spend (calls made without a reservation, as the priced spans now say) of every
    period of the project's budgets that holds a day of ``since``..``until`` (the project's days), and
    set each ledger row that differs. Returns how many it set. For ``costs_rederive``, after a price or
    a time zone changed: the ledger rows are locked first, so a projection that commits meanwhile adds
    its spend after the recount (run it again to confirm: it then sets none)."""
    from .models import SpanCost

    budgets = budgets_of([project_id])
    if not budgets:
        return 0
    tz = budgets[0].project_tz
    targets: set[tuple[int, date]] = set()
    day = since
    while day <= until:
        for b in budgets:
            for moment in (datetime.combine(day, time(0), tzinfo=tz), datetime.combine(day, time(23, 59), tzinfo=tz)):
                targets.add((b.id, b.period_of(moment)))
        day += timedelta(days=1)
    by_id = {b.id: b for b in budgets}
    # The project's days that any of those periods holds (a day either side: other time zones).
    first = min(datetime.combine(start, time(0), tzinfo=by_id[i].tz).astimezone(tz).date() for i, start in targets)
    last = max(resets_at(by_id[i].period, start, by_id[i].tz).astimezone(tz).date() for i, start in targets)
    with transaction.atomic():
        rows = {(r.budget_id, r.period_start): r for r in BudgetLedger.objects.select_for_update().filter(
            budget_id__in=[i for i, _ in targets], period_start__in={s for _, s in targets}).order_by("id")}
        counted: dict[tuple[int, date], int] = defaultdict(int)
        cells = (SpanCost.objects.filter(project_id=project_id, reservation_id=0, day__gte=first - timedelta(days=1),
                                         day__lte=last + timedelta(days=1), cost_nanos__gt=0)
                 .values_list("day", "hour", "end_user", "agent_name", "api_key_id", "model")
                 .annotate(total=Sum("cost_nanos")).order_by())
        for day_, hour, end_user, agent, key, model, total in cells:
            moment = datetime.combine(day_, time(hour), tzinfo=tz)
            for b in budgets:
                if matches(b, agent=agent, end_user=end_user, model=model, api_key_id=key):
                    target = (b.id, b.period_of(moment))
                    if target in targets:
                        counted[target] += total
        changed = 0
        for target in sorted(targets):
            row, want = rows.get(target), counted.get(target, 0)
            if row is None and want:
                b = by_id[target[0]]
                BudgetLedger.objects.create(project_id=project_id, budget_id=b.id, period_start=target[1],
                                            cap_nanos=b.cap_nanos, hard=b.hard, traced_nanos=want)
                changed += 1
            elif row is not None and row.traced_nanos != want:
                BudgetLedger.objects.filter(pk=row.pk).update(traced_nanos=want)
                changed += 1
    return changed


# --- thresholds -----------------------------------------------------------------------------------


def _as_date(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


def _alert(rows: list[tuple], *, spent_delta: int, project_id: int = 0,
           budgets: dict[int, Applicable] | None = None) -> None:
    """Record each threshold a write just crossed (spent before it below, after it at or above), once
    per budget, period and threshold; its webhook and email go after commit."""
    if not rows or spent_delta <= 0:
        return
    if budgets is None:
        budgets = {b.id: b for b in budgets_of({project_id})}
    for budget_id, start, charged, traced, cap in rows:
        b = budgets.get(budget_id)
        if b is None or not b.thresholds or cap <= 0:
            continue
        spent = charged + traced
        for threshold in b.thresholds:
            line = cap * threshold / 100
            if spent - spent_delta < line <= spent:
                _record_alert(b, _as_date(start), threshold, spent, cap)


def _record_alert(b: Applicable, start: date, threshold: int, spent: int, cap: int) -> None:
    try:
        with transaction.atomic():
            alert = BudgetAlert.objects.create(project_id=b.project_id, budget_id=b.id, period_start=start,
                                               threshold=threshold, spent_nanos=spent, cap_nanos=cap)
    except IntegrityError:
        return  # crossed already this period (spend went down and up again)
    from .live import publish_alert
    from .tasks import budget_alert_notify

    transaction.on_commit(lambda: budget_alert_notify.delay(alert.pk))
    transaction.on_commit(lambda: publish_alert(project_id=b.project_id, budget_id=b.id, threshold=threshold))
