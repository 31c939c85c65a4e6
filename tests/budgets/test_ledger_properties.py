"""The ledger's invariants under any sequence of reserve, settle, release, expire and a new period
(a Hypothesis state machine against the real services and database), with a model of what each
reservation should get: admitted exactly when it fits under every hard budget that applies."""
from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from apps.budgets import ledger, services
from apps.budgets.models import Budget, BudgetLedger, Reservation

pytestmark = pytest.mark.django_db

_names = itertools.count()
AGENTS = ("a", "b")
USERS = ("u", "v")
TTL = 600


def machine_for(project):
    class LedgerMachine(RuleBasedStateMachine):
        reservations = Bundle("reservations")

        def __init__(self) -> None:
            super().__init__()
            n = next(_names)
            self.now = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)
            mk = lambda **f: services.budget_create(project=project, actor=None, name=f"b{n}-{len(self.budgets)}",  # noqa: E731
                                                    **f)
            self.budgets: list[Budget] = []
            for fields in ({"cap_nanos": 1000, "time_zone": "America/New_York"},
                           {"cap_nanos": 400, "scope": "agent", "value": "a"},
                           {"cap_nanos": 300, "scope": "end_user", "value": "u", "hard": False},
                           {"cap_nanos": 2000, "period": "month", "time_zone": "Asia/Kolkata"}):
                self.budgets.append(mk(**fields))
            # The model: per (budget, period) what is charged and held; per reservation its state.
            self.charged: dict[tuple[int, object], int] = {}
            self.held: dict[tuple[int, object], int] = {}
            self.ids = {b.pk for b in self.budgets}

        def _applies(self, b: Budget, agent: str, user: str) -> bool:
            return b.scope == "project" or (b.scope == "agent" and b.value == agent) or (
                b.scope == "end_user" and b.value == user)

        def _period(self, b: Budget, moment: datetime):
            a = ledger.budgets_of([project.pk])
            return next(x for x in a if x.id == b.pk).period_of(moment)

        @rule(target=reservations, agent=st.sampled_from(AGENTS), user=st.sampled_from(USERS),
              amount=st.one_of(st.sampled_from([0, 100, 200, 400]), st.integers(min_value=0, max_value=500)))
        def reserve(self, agent, user, amount):
            rows = [(b, self._period(b, self.now)) for b in self.budgets if self._applies(b, agent, user)]
            fits = all(not b.hard or self.charged.get((b.pk, p), 0) + self.held.get((b.pk, p), 0) + amount <= b.cap_nanos
                       for b, p in rows)
            try:
                held = services.reservation_create(project_id=project.pk, api_key_id=0, estimated_nanos=amount,
                                                   agent=agent, end_user=user, ttl_seconds=TTL, now=self.now)
            except ledger.BudgetExceeded as exc:
                assert not fits, "refused although it fits"
                refused = {r["id"] for r in exc.refusals}
                assert refused and refused <= {b.pk for b, _ in rows if b.hard}
                return None
            assert fits, "admitted past a hard cap"
            for b, p in rows:
                self.held[(b.pk, p)] = self.held.get((b.pk, p), 0) + amount
            return (held.reservation.pk, tuple((b.pk, p) for b, p in rows), amount)

        def _get(self, ref) -> Reservation:
            return Reservation.objects.get(pk=ref[0])

        @rule(ref=reservations, share=st.floats(min_value=0, max_value=1))
        def settle(self, ref, share):
            if ref is None:
                return
            r = self._get(ref)
            before = r.state
            actual = int(ref[2] * share)
            try:
                services.reservation_settle(reservation=r, cost_nanos=actual, now=self.now)
            except ledger.ReservationClosed:
                assert before == "released"
                return
            if before == "held":
                for k in ref[1]:
                    self.held[k] -= ref[2]
                    self.charged[k] = self.charged.get(k, 0) + actual
            elif before == "expired":
                for k in ref[1]:
                    self.charged[k] += actual - ref[2]
            # settled already: nothing moves

        @rule(ref=reservations)
        def release(self, ref):
            if ref is None:
                return
            r = self._get(ref)
            before = r.state
            try:
                services.reservation_release(reservation=r, now=self.now)
            except ledger.ReservationClosed:
                assert before == "settled"
                return
            for k in ref[1]:
                if before == "held":
                    self.held[k] -= ref[2]
                elif before == "expired":
                    self.charged[k] -= ref[2]

        @rule(minutes=st.integers(min_value=1, max_value=30))
        def time_passes_and_the_sweep_expires(self, minutes):
            self.now += timedelta(minutes=minutes)
            due = list(Reservation.objects.filter(state="held", expires_at__lte=self.now,
                                                  project=project).values_list("pk", "estimate_nanos", "ledger_ids"))
            expired = ledger.expire_due(now=self.now)
            assert expired == len(due)
            by_id = {row.pk: (row.budget_id, row.period_start) for row in BudgetLedger.objects.filter(
                pk__in={i for _, _, ids in due for i in ids})}
            for _, amount, ids in due:
                for i in ids:
                    k = by_id[i]
                    self.held[k] -= amount
                    self.charged[k] = self.charged.get(k, 0) + amount

        @rule(hours=st.integers(min_value=1, max_value=30))
        def a_new_period_begins(self, hours):
            self.now += timedelta(hours=hours)

        def teardown(self):
            # The examples share the test's transaction: close what this one left held, retire its budgets.
            for r in Reservation.objects.filter(state="held"):
                ledger.release(r, now=self.now)
            Budget.objects.filter(pk__in=self.ids).update(enabled=False)
            ledger.forget_budgets(project.pk)

        @invariant()
        def the_ledger_is_the_model_and_no_hard_cap_is_passed(self):
            for row in BudgetLedger.objects.filter(budget_id__in=self.ids).select_related("budget"):
                k = (row.budget_id, row.period_start)
                assert (row.charged_nanos, row.held_nanos) == (self.charged.get(k, 0), self.held.get(k, 0)), k
                assert row.traced_nanos == 0
                if row.budget.hard:
                    assert row.charged_nanos + row.held_nanos <= row.budget.cap_nanos

    return LedgerMachine


def test_the_ledger_keeps_its_invariants_under_any_sequence(project):
    run_state_machine_as_test(machine_for(project), settings=settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
