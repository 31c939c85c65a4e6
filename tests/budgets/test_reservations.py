"""Daily caps at the call boundary: budgets, reservations held before a paid call and settled after,
refusals that name their budget, spend from traces that counts, thresholds that alert once, and
periods that begin at the budget's own midnight."""
from __future__ import annotations

import json
import os
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.core import mail
from django.core.management import call_command

from apps.audit.models import AuditEvent
from apps.budgets import ledger, notify, services
from apps.budgets.models import Budget, BudgetAlert, BudgetLedger, PriceOverride, Reservation
from apps.budgets.tasks import budget_alert_notify
from apps.projects import services as project_services
from tests.traces.helpers import drain

pytestmark = pytest.mark.django_db

USD = 10**9  # nano-USD


def post(client, url, body=None):
    return client.post(url, data=json.dumps(body or {}), content_type="application/json")


@pytest.fixture
def agent(project, make_key, key_client):
    key, raw = make_key(project, scopes=("budget", "ingest", "read"), name="support-bot")
    client = key_client(raw)
    client.key = key
    return client


def budget(project, actor, **fields) -> Budget:
    fields.setdefault("name", "daily")
    fields.setdefault("cap_nanos", 1 * USD)
    return services.budget_create(project=project, actor=actor, **fields)


def reserve(client, **body):
    return post(client, "/api/v1/budget/reservations", body)


def ledger_of(b: Budget) -> BudgetLedger:
    return BudgetLedger.objects.get(budget=b)


def test_a_reservation_holds_its_estimate_and_the_settle_charges_what_the_call_cost(project, alice, agent):
    b = budget(project, alice, cap_nanos=1 * USD)
    r = reserve(agent, estimated_cost_usd="0.40", agent="support", run_id="run-1")
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["state"] == "held" and body["held_usd"] == "0.400000000"
    [out] = body["budgets"]
    assert (out["name"], out["cap_usd"], out["spent_usd"], out["held_usd"], out["remaining_usd"]) == (
        "daily", "1.000000000", "0.000000000", "0.400000000", "0.600000000")
    row = ledger_of(b)
    assert (row.held_nanos, row.charged_nanos) == (400_000_000, 0)

    s = post(agent, f"/api/v1/budget/reservations/{body['id']}/settle", {"cost_usd": "0.15"})
    assert s.status_code == 200, s.content
    assert (s.json()["state"], s.json()["charged_usd"]) == ("settled", "0.150000000")
    row.refresh_from_db()
    assert (row.held_nanos, row.charged_nanos) == (0, 150_000_000)


def test_a_reservation_past_the_cap_is_refused_402_naming_the_budget_and_holds_nothing(project, alice, agent):
    b = budget(project, alice, name="support-daily", scope="agent", value="support", cap_nanos=1 * USD)
    assert reserve(agent, estimated_cost_usd="0.70", agent="support").status_code == 201
    r = reserve(agent, estimated_cost_usd="0.31", agent="support", run_id="run-2")
    assert r.status_code == 402, r.content
    err = r.json()
    assert err["error_code"] == "budget_exceeded"
    refused = err["details"]["budget"]
    assert (refused["id"], refused["name"], refused["cap_usd"], refused["spent_usd"], refused["held_usd"]) == (
        b.pk, "support-daily", "1.000000000", "0.000000000", "0.700000000")
    tomorrow = datetime.combine(date.today() + timedelta(days=1), datetime.min.time(), tzinfo=ZoneInfo("UTC"))
    assert refused["resets_at"] == tomorrow.isoformat()
    assert "support-daily" in err["message"]
    assert ledger_of(b).held_nanos == 700_000_000  # the refused call held nothing
    kept = Reservation.objects.get(pk=err["details"]["reservation_id"])
    assert (kept.state, kept.refused_by_id, kept.run_id) == ("refused", b.pk, "run-2")
    # Another agent is under no budget of this scope.
    assert reserve(agent, estimated_cost_usd="0.90", agent="billing").status_code == 201
    # Exactly what is left fits.
    assert reserve(agent, estimated_cost_usd="0.30", agent="support").status_code == 201


def test_one_refusing_budget_rolls_back_the_holds_on_the_others(project, alice, agent):
    whole = budget(project, alice, name="project", cap_nanos=10 * USD)
    user = budget(project, alice, name="per-user", scope="end_user", value="u-1", cap_nanos=1 * USD)
    assert reserve(agent, estimated_cost_usd="0.60", end_user="u-1").status_code == 201
    r = reserve(agent, estimated_cost_usd="0.60", end_user="u-1")
    assert r.status_code == 402 and r.json()["details"]["budget"]["name"] == "per-user"
    assert ledger_of(whole).held_nanos == 600_000_000 and ledger_of(user).held_nanos == 600_000_000


def test_an_estimate_above_the_whole_cap_is_refused_even_in_a_fresh_period(project, alice, agent):
    budget(project, alice, cap_nanos=1 * USD)
    r = reserve(agent, estimated_cost_usd="1.000000001")
    assert r.status_code == 402 and r.json()["details"]["budget"]["spent_usd"] == "0.000000000"
    assert not BudgetLedger.objects.exists()


def test_a_soft_budget_admits_past_its_cap_and_alerts_once_per_threshold(project, alice, agent):
    b = budget(project, alice, hard=False, cap_nanos=1 * USD, thresholds=[50, 100])
    ids = []
    for _ in range(3):
        r = reserve(agent, estimated_cost_usd="0.60")
        assert r.status_code == 201
        ids.append(r.json()["id"])
    assert ledger_of(b).held_nanos == 1_800_000_000
    assert not BudgetAlert.objects.exists()  # holds are not spend
    for rid in ids:
        assert post(agent, f"/api/v1/budget/reservations/{rid}/settle", {"cost_usd": "0.45"}).status_code == 200
    assert sorted(BudgetAlert.objects.values_list("threshold", "spent_nanos")) == [(50, 900_000_000),
                                                                                 (100, 1_350_000_000)]


def test_the_estimate_from_a_model_is_an_upper_bound_and_the_usage_is_priced_on_settle(project, alice, agent):
    budget(project, alice, cap_nanos=1 * USD)
    # gpt-4o: $2.50 in (no dearer cache-write price), $10 out per million tokens.
    r = reserve(agent, model="gpt-4o", provider="openai", input_tokens=1000, max_output_tokens=500)
    assert r.status_code == 201, r.content
    assert r.json()["held_usd"] == "0.007500000"
    s = post(agent, f"/api/v1/budget/reservations/{r.json()['id']}/settle",
             {"usage": {"input_tokens": 1000, "output_tokens": 200}})
    assert s.json()["charged_usd"] == "0.004500000"


def test_an_unpriced_model_is_refused_with_its_own_code_unless_the_project_admits_it(project, alice, agent):
    r = reserve(agent, model="house-model-7", provider="self", max_output_tokens=100)
    assert r.status_code == 422 and r.json()["error_code"] == "model_unpriced"
    services.cost_settings_update(project=project, actor=alice, unpriced_reservations=True)
    r = reserve(agent, model="house-model-7", provider="self", max_output_tokens=100)
    assert r.status_code == 201 and r.json()["held_usd"] == "0.000000000"


def test_settle_and_release_are_idempotent_and_never_both(project, alice, agent):
    b = budget(project, alice)
    first = reserve(agent, estimated_cost_usd="0.50").json()["id"]
    url = f"/api/v1/budget/reservations/{first}"
    a = post(agent, f"{url}/settle", {"cost_usd": "0.20"})
    again = post(agent, f"{url}/settle", {"cost_usd": "0.45"})
    assert a.status_code == again.status_code == 200 and a.json() == again.json()
    refused = post(agent, f"{url}/release")
    assert refused.status_code == 409 and refused.json()["error_code"] == "reservation_closed"

    second = reserve(agent, estimated_cost_usd="0.30").json()["id"]
    url = f"/api/v1/budget/reservations/{second}"
    assert post(agent, f"{url}/release").json()["state"] == "released"
    assert post(agent, f"{url}/release").json()["state"] == "released"
    assert post(agent, f"{url}/settle", {"cost_usd": "0.10"}).status_code == 409
    row = ledger_of(b)
    assert (row.charged_nanos, row.held_nanos) == (200_000_000, 0)
    assert agent.get(url).json()["state"] == "released"


def test_an_unsettled_reservation_is_charged_in_full_when_it_expires_and_a_late_settle_reconciles_once(
        project, alice, agent):
    b = budget(project, alice)
    r = reserve(agent, estimated_cost_usd="0.50", ttl_seconds=60).json()
    assert ledger.expire_due(now=datetime.fromisoformat(r["expires_at"]) - timedelta(seconds=1)) == 0
    assert ledger.expire_due(now=datetime.fromisoformat(r["expires_at"]) + timedelta(seconds=1)) == 1
    row = ledger_of(b)
    assert (row.charged_nanos, row.held_nanos) == (500_000_000, 0)
    url = f"/api/v1/budget/reservations/{r['id']}/settle"
    assert post(agent, url, {"cost_usd": "0.10"}).json()["state"] == "settled"
    assert post(agent, url, {"cost_usd": "0.10"}).json()["charged_usd"] == "0.100000000"
    row.refresh_from_db()
    assert (row.charged_nanos, row.held_nanos) == (100_000_000, 0)


def test_spend_that_arrives_only_through_traces_counts_and_pushes_later_reservations_over(project, alice, agent):
    b = budget(project, alice, cap_nanos=1 * USD, scope="agent", value="support")
    now = datetime.now(ZoneInfo("UTC")).isoformat()
    assert post(agent, "/api/v1/runs", {"run_id": "traced", "agent": {"name": "support"},
                                        "started_at": now}).status_code == 202
    assert post(agent, "/api/v1/runs/traced/spans", [
        {"span_id": "c1", "kind": "llm", "provider": "openai", "model": "gpt-4o", "start_time": now, "end_time": now,
         "cost_usd": "0.80"},
        # A call made under a reservation: the settle counts it, never the trace a second time.
        {"span_id": "c2", "kind": "llm", "provider": "openai", "model": "gpt-4o", "start_time": now, "end_time": now,
         "cost_usd": "0.15", "attributes": {"controlplane.reservation_id": 12345}},
    ]).status_code == 202
    drain()
    assert ledger_of(b).traced_nanos == 800_000_000
    r = reserve(agent, estimated_cost_usd="0.25", agent="support")
    assert r.status_code == 402 and r.json()["details"]["budget"]["spent_usd"] == "0.800000000"
    assert reserve(agent, estimated_cost_usd="0.20", agent="support").status_code == 201


def test_traced_spend_whose_agent_arrives_late_moves_to_that_agent_s_budget(project, alice, agent):
    b = budget(project, alice, cap_nanos=1 * USD, scope="agent", value="support")
    now = datetime.now(ZoneInfo("UTC")).isoformat()
    assert post(agent, "/api/v1/runs/late/spans", [
        {"span_id": "c1", "kind": "llm", "provider": "openai", "model": "gpt-4o", "start_time": now, "end_time": now,
         "cost_usd": "0.30"}]).status_code == 202
    drain()
    assert not BudgetLedger.objects.filter(budget=b).exists()
    assert post(agent, "/api/v1/runs", {"run_id": "late", "agent": {"name": "support"},
                                        "started_at": now}).status_code == 202
    drain()
    assert ledger_of(b).traced_nanos == 300_000_000


def test_a_period_begins_at_the_budget_s_own_midnight(project, alice):
    key, _ = project_services.api_key_create(project=project, name="k", scopes=["budget"], actor=None)
    b = budget(project, alice, time_zone="America/New_York", cap_nanos=1 * USD)
    tz = ZoneInfo("America/New_York")
    before = datetime(2026, 11, 30, 23, 59, 30, tzinfo=tz)   # 04:59:30 UTC on Dec 1st
    after = datetime(2026, 12, 1, 0, 0, 30, tzinfo=tz)
    late = services.reservation_create(project_id=project.pk, api_key_id=key.pk, estimated_nanos=900_000_000,
                                       now=before)
    assert late.budgets[0]["period_start"] == "2026-11-30"
    assert late.budgets[0]["resets_at"] == "2026-12-01T05:00:00+00:00"
    with pytest.raises(ledger.BudgetExceeded):
        services.reservation_create(project_id=project.pk, api_key_id=key.pk, estimated_nanos=200_000_000, now=before)
    fresh = services.reservation_create(project_id=project.pk, api_key_id=key.pk, estimated_nanos=900_000_000,
                                        now=after)
    assert fresh.budgets[0]["period_start"] == "2026-12-01" and fresh.budgets[0]["spent_usd"] == "0.000000000"
    # Settled after midnight, the first call still counts in the day it was made.
    services.reservation_settle(reservation=late.reservation, cost_nanos=500_000_000, now=after)
    assert dict(BudgetLedger.objects.filter(budget=b).values_list("period_start", "charged_nanos")) == {
        date(2026, 11, 30): 500_000_000, date(2026, 12, 1): 0}
    monthly = budget(project, alice, name="monthly", period="month", time_zone="Asia/Kolkata", cap_nanos=5 * USD)
    held = services.reservation_create(project_id=project.pk, api_key_id=key.pk, estimated_nanos=1,
                                       now=datetime(2026, 11, 30, 18, 31, tzinfo=ZoneInfo("UTC")))  # Dec 1st, 00:01 IST
    assert {o["name"]: o["period_start"] for o in held.budgets}["monthly"] == "2026-12-01"
    assert monthly.pk in {o["id"] for o in held.budgets}


def test_budgets_are_changed_by_project_admins_and_every_change_is_audited(project, alice, bob, client_for, agent):
    admin, auditor = client_for(alice), client_for(bob)
    body = {"name": "daily", "cap_usd": "25.50", "scope": "agent", "value": "support", "thresholds": [80, 100]}
    assert post(auditor, "/api/v1/projects/acme/budgets", body).status_code == 403
    r = post(admin, "/api/v1/projects/acme/budgets", body)
    assert r.status_code == 201, r.content
    created = r.json()
    assert (created["cap_usd"], created["current"]["remaining_usd"]) == ("25.500000000", "25.500000000")
    r = admin.patch(f"/api/v1/projects/acme/budgets/{created['id']}", data=json.dumps({"cap_usd": "30"}),
                    content_type="application/json")
    assert r.status_code == 200 and r.json()["cap_usd"] == "30.000000000"
    bad = post(admin, "/api/v1/projects/acme/budgets", {"name": "x", "cap_usd": "1", "scope": "agent"})
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "value"
    assert admin.delete(f"/api/v1/projects/acme/budgets/{created['id']}").status_code == 204
    assert list(AuditEvent.objects.filter(action__startswith="budgets.budget").order_by("seq")
                .values_list("action", flat=True)) == ["budgets.budget_created", "budgets.budget_updated",
                                                       "budgets.budget_deleted"]
    # Reservations are per call: never audited.
    budget(project, alice)
    count = AuditEvent.objects.count()
    assert reserve(agent, estimated_cost_usd="0.1").status_code == 201
    assert AuditEvent.objects.count() == count


def test_bad_reservations_get_a_clear_error_and_store_nothing(agent):
    for body, field in (({}, "estimated_cost_usd"), ({"estimated_cost_usd": "-1"}, "estimated_cost_usd"),
                        ({"model": "gpt-4o"}, "estimated_cost_usd"), ({"estimated_cost_usd": "1", "agent": "a\x00"},
                                                                       "agent"),
                        ({"estimated_cost_usd": "1", "ttl_seconds": 0}, "ttl_seconds")):
        r = reserve(agent, **body)
        assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", (body, r.content)
        assert field in r.json()["details"]["fields"], (body, r.json())
    assert not Reservation.objects.exists()


def test_a_crossed_threshold_is_sent_signed_to_the_project_s_webhook_and_by_email(project, alice, agent, receiver,
                                                                                   settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    base, got = receiver
    project_services.project_update(project=project, actor=alice, webhook_allowlist=[f"{base}/hooks/"])
    services.cost_settings_update(project=project, actor=alice, webhook_url=f"{base}/hooks/budgets",
                                  alert_emails=["finops@example.com"])
    budget(project, alice, cap_nanos=1 * USD, thresholds=[80])
    rid = reserve(agent, estimated_cost_usd="0.9").json()["id"]
    post(agent, f"/api/v1/budget/reservations/{rid}/settle", {"cost_usd": "0.85"})
    [alert] = BudgetAlert.objects.all()
    budget_alert_notify.apply(args=[alert.pk])
    [(path, headers, body)] = got
    payload = json.loads(body)
    assert (path, payload["type"], payload["threshold_percent"], payload["spent_usd"]) == (
        "/hooks/budgets", "budget.threshold", 80, "0.850000000")
    project.refresh_from_db()
    assert notify.verify(project.webhook_secret, body, headers["X-Controlplane-Signature"])
    [email] = mail.outbox
    assert "80%" in email.subject
    assert Decimal(payload["cap_usd"]) == 1


def test_costs_rederive_recounts_the_traced_spend_of_the_ledgers_after_a_price_is_added(project, alice, agent):
    b = budget(project, alice, cap_nanos=1 * USD, scope="agent", value="support")
    month = budget(project, alice, name="monthly", cap_nanos=10 * USD, period="month")
    now = datetime.now(ZoneInfo("UTC")).isoformat()
    assert post(agent, "/api/v1/runs", {"run_id": "unpriced", "agent": {"name": "support"},
                                        "started_at": now}).status_code == 202
    assert post(agent, "/api/v1/runs/unpriced/spans", [
        {"span_id": "c1", "kind": "llm", "provider": "acme", "model": "acme-7b", "start_time": now, "end_time": now,
         "usage": {"input_tokens": 100_000, "output_tokens": 10_000}},
        {"span_id": "c2", "kind": "llm", "provider": "openai", "model": "gpt-4o", "start_time": now, "end_time": now,
         "cost_usd": "0.10", "attributes": {"controlplane.reservation_id": 777}},  # the settle's: not traced
    ]).status_code == 202
    drain()
    assert not BudgetLedger.objects.filter(budget=b).exists()  # unpriced: nothing counted yet
    # A price for acme-7b: $2 in, $10 out per million tokens -> $0.20 + $0.10.
    PriceOverride.objects.create(project=project, provider="acme", model_pattern="acme-7b",
                                 effective_from=date(2026, 1, 1), input_per_mtok=Decimal(2), output_per_mtok=Decimal(10))
    services.forget_prices(project.pk)  # created without the service: this process reads prices afresh
    call_command("costs_rederive", "--project", project.slug, "--days", "2", stdout=open(os.devnull, "w"))
    assert ledger_of(b).traced_nanos == 300_000_000
    assert ledger_of(month).traced_nanos == 300_000_000
    r = reserve(agent, estimated_cost_usd="0.75", agent="support")
    assert r.status_code == 402 and r.json()["details"]["budget"]["spent_usd"] == "0.300000000"
    # Run again: nothing left to repair.
    assert ledger.repair_traced(project.pk, since=date.today() - timedelta(days=1), until=date.today()) == 0
