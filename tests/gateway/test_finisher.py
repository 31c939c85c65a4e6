"""The gateway's group commit: calls finished together are settled and recorded in one transaction, with
one inbox batch per key; a call that cannot be finished fails alone, the others of its group are
finished all the same; the finisher's thread finishes what is handed to it. Real database, no server
(the calls are begun as the app begins them)."""
from __future__ import annotations

import uuid

import pytest
from django.utils import timezone

from apps.budgets import services as budgets
from apps.budgets.models import BudgetLedger, Reservation
from apps.gateway import app, calls, services
from apps.traces.models import IngestBatch, Run
from tests.gateway.conftest import needs_postgres
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db(transaction=True)

USAGE = {"input_tokens": 1_000, "output_tokens": 100}  # gpt-4o: $0.0025 + $0.001
COST = 3_500_000


@pytest.fixture
def keys(project, make_key):
    services.upstream_create(project=project, actor=None, name="local", base_url="http://127.0.0.1:9/v1",
                             provider="openai", model_names=["gpt-4o"])
    budgets.budget_create(project=project, actor=None, name="daily", cap_nanos=10**9)
    return [make_key(project, scopes=("budget", "ingest"), name=f"agent-{i}")[1] for i in range(2)]


def _begin(raw: str, run_id: str) -> calls.Call:
    return calls.begin(raw_key=raw, endpoint="chat.completions", headers={"x-run-id": run_id},
                       body={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})


def _done(call: calls.Call) -> calls.Finished:
    a = calls.Attempt(route=call.routes[0], span_id=uuid.uuid4().hex[:16], started_at=call.started_at,
                      ended_at=timezone.now(), ok=True, usage=dict(USAGE))
    return calls.Finished(call, [a], a)


def test_calls_finished_together_take_one_commit_and_one_inbox_batch_per_key(keys):
    group = [_begin(keys[i % 2], f"run-{i}") for i in range(5)]
    ledger = BudgetLedger.objects.get()
    assert ledger.held_nanos > 0 and ledger.reservations == 5
    calls.finish_many([_done(c) for c in group])
    batches = IngestBatch.objects.filter(source="gateway")
    assert batches.count() == 2  # one per key: 3 calls' spans in one, 2 in the other
    assert sorted(len(b.payload) for b in batches) == [2, 3]
    assert set(Reservation.objects.values_list("state", "charged_nanos")) == {("settled", COST)}
    ledger.refresh_from_db()
    assert (ledger.held_nanos, ledger.charged_nanos) == (0, 5 * COST)
    drain()
    assert Run.objects.filter(run_id__startswith="run-").count() == 5


def test_a_call_that_cannot_be_finished_fails_alone_and_the_rest_of_its_group_is_finished(keys):
    good, bad, other = (_begin(keys[0], f"g-{i}") for i in range(3))
    budgets.reservation_release(reservation=Reservation.objects.get(pk=bad.reservation.pk))  # settles no more
    finisher = app._Finisher()
    items = [(_done(c), app.concurrent.futures.Future()) for c in (good, bad, other)]
    finisher._write(items)  # one group, as the thread takes it
    outcomes = [f.exception(timeout=0) for _, f in items]
    assert outcomes[0] is None and outcomes[2] is None
    assert type(outcomes[1]).__name__ == "ReservationClosed"
    states = dict(Reservation.objects.values_list("pk", "state"))
    assert (states[good.reservation.pk], states[bad.reservation.pk], states[other.reservation.pk]) == (
        "settled", "released", "settled")
    ledger = BudgetLedger.objects.get()
    assert (ledger.held_nanos, ledger.charged_nanos) == (0, 2 * COST)
    assert IngestBatch.objects.filter(source="gateway").count() == 2  # good's and other's, each alone


@needs_postgres  # SQLite's in-memory test database is locked across threads
def test_the_finisher_thread_finishes_what_it_is_handed(keys):
    finisher = app._Finisher()
    try:
        futures = [finisher.submit(_done(_begin(keys[0], f"t-{i}"))) for i in range(8)]
        for f in futures:
            assert f.result(timeout=30) is None
    finally:
        finisher.stop()
    assert Reservation.objects.filter(state="settled").count() == 8
    assert sum(len(b.payload) for b in IngestBatch.objects.filter(source="gateway")) == 8
