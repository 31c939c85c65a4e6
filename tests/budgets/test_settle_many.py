"""Settling many reservations at once (the gateway's group commit): the ledger ends where settling them
one by one would leave it, an expired one in the group is reconciled once, a closed one refuses the
whole group, thresholds crossed by the group are recorded once."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from apps.budgets import ledger, services
from apps.budgets.models import BudgetAlert, BudgetLedger, Reservation

pytestmark = pytest.mark.django_db

USD = 10**9


@pytest.fixture
def budgets(project):
    services.budget_create(project=project, actor=None, name="project", cap_nanos=10 * USD, thresholds=[50])
    services.budget_create(project=project, actor=None, name="bot", scope="agent", value="bot", cap_nanos=5 * USD)
    return project


def _hold(project, amount, agent="bot"):
    return ledger.reserve(project_id=project.pk, api_key_id=0, amount=amount, agent=agent).reservation


def _rows():
    return {r.budget.name: (r.held_nanos, r.charged_nanos) for r in BudgetLedger.objects.select_related("budget")}


def test_a_group_of_settles_leaves_the_ledger_where_one_by_one_would(budgets):
    held = [_hold(budgets, USD) for _ in range(3)] + [_hold(budgets, USD, agent="other")]
    expired = _hold(budgets, USD)
    assert ledger.expire(expired, now=timezone.now() + timedelta(hours=1))  # charged its whole hold
    actual = [USD // 2, USD // 4, USD, USD // 10]
    ledger.settle_many([(r, a, {"output_tokens": i}) for i, (r, a) in enumerate(zip(held, actual, strict=True))]
                       + [(Reservation.objects.get(pk=expired.pk), USD // 5, None)])
    spent = sum(actual) + USD // 5
    assert _rows() == {"project": (0, spent), "bot": (0, spent - USD // 10)}
    states = dict(Reservation.objects.values_list("pk", "charged_nanos"))
    assert [states[r.pk] for r in held] == actual and states[expired.pk] == USD // 5
    assert set(Reservation.objects.values_list("state", flat=True)) == {"settled"}
    assert Reservation.objects.get(pk=held[0].pk).usage == {"output_tokens": 0}
    assert not BudgetAlert.objects.exists()  # $2.05 of $10: under its 50 %


def test_a_group_crossing_a_threshold_records_it_once(budgets):
    group = [_hold(budgets, 2 * USD, agent="x") for _ in range(4)]
    ledger.settle_many([(r, 2 * USD, None) for r in group])
    [(name, threshold, spent)] = BudgetAlert.objects.values_list("budget__name", "threshold", "spent_nanos")
    # One by one (SQLite) the settle that crossed it records $6; in one statement, the group's $8.
    assert (name, threshold) == ("project", 50) and 5 * USD <= spent <= 8 * USD


def test_a_released_reservation_in_the_group_refuses_it_whole(budgets):
    first, second = _hold(budgets, USD), _hold(budgets, USD)
    ledger.release(Reservation.objects.get(pk=second.pk))
    with pytest.raises(ledger.ReservationClosed), transaction.atomic():
        ledger.settle_many([(first, USD // 2, None), (second, USD // 2, None)])
    assert Reservation.objects.get(pk=first.pk).state == "held"  # the caller's transaction is undone
    assert _rows() == {"project": (USD, 0), "bot": (USD, 0)}
