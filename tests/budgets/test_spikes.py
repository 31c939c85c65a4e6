"""Spend spikes: a week of hourly spend replayed through the run log with one runaway hour, judged hour
by hour as the beat would; exactly that hour is flagged, once; its webhook is HMAC-signed and goes only
to an allowlisted URL; its email is sent."""
from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.core.exceptions import ValidationError

from apps.budgets import notify, services, spikes
from apps.budgets.models import CostHour, CostSpike
from apps.budgets.tasks import spike_notify
from apps.projects import services as project_services
from apps.traces import records
from tests.traces.helpers import accept, drain

pytestmark = pytest.mark.django_db

START = datetime(2026, 11, 16, tzinfo=UTC)
RUNAWAY = (date(2026, 11, 22), 14)
USERS = ("u-0", "u-1", "u-2", "u-3")


def _week_of_spend(project, key) -> None:
    """Eight days of hourly calls to gpt-4o ($2.50 per million prompt tokens): about $2 an hour (+-20 %),
    one user per hour of the day, and one runaway hour at 20 times that."""
    rng = random.Random(11)
    recs = []
    for i in range(8 * 24):
        moment = START + timedelta(hours=i)
        tokens = int(800_000 * rng.uniform(0.8, 1.2))
        if (moment.date(), moment.hour) == RUNAWAY:
            tokens = 16_000_000
        run_id = f"r{i}"
        recs.append(records.run_start_record({"run_id": run_id, "agent": {"name": "bot"},
                                              "end_user": USERS[moment.hour % 4],
                                              "started_at": moment.isoformat()}, received_at=moment.isoformat()))
        recs.append(records.span_record(run_id, {
            "span_id": "s", "kind": "llm", "provider": "openai", "model": "gpt-4o",
            "start_time": (moment + timedelta(minutes=5)).isoformat(),
            "end_time": (moment + timedelta(minutes=6)).isoformat(),
            "usage": {"input_tokens": tokens, "output_tokens": 0}}, received_at=moment.isoformat()))
    accept(project, key, recs)
    drain()


def test_a_week_with_one_runaway_hour_flags_exactly_that_hour(project, make_key, django_capture_on_commit_callbacks):
    _week_of_spend(project, make_key(project)[0])
    assert CostHour.objects.filter(scope="project").count() == 8 * 24
    with django_capture_on_commit_callbacks(execute=False):
        for i in range(8 * 24):  # the beat, hour after hour
            moment = START + timedelta(hours=i)
            spikes.detect_hour(project, moment.date(), moment.hour)
    user = USERS[RUNAWAY[1] % 4]
    hours = {(s.day, s.hour, s.scope, s.value) for s in CostSpike.objects.filter(period="hour")}
    assert hours == {(*RUNAWAY, "project", ""), (*RUNAWAY, "agent", "bot"), (*RUNAWAY, "end_user", user)}
    # As days: the project's and the agent's day was 1.8 times its usual (not a spike); the user who
    # ran away spends six hours a day, so their day was 4 times theirs.
    days = {(s.day, s.hour, s.scope, s.value) for s in CostSpike.objects.filter(period="day")}
    assert days == {(RUNAWAY[0], None, "end_user", user)}
    spike = CostSpike.objects.get(scope="project")
    assert spike.spend_nanos == 40_000_000_000 and 1_600_000_000 < spike.baseline_nanos < 2_400_000_000

    # Judged again (the beat runs every minute): recorded once.
    spikes.detect_hour(project, *RUNAWAY)
    assert CostSpike.objects.count() == 4


def test_the_threshold_and_the_minimum_are_the_project_s(project, make_key, alice):
    _week_of_spend(project, make_key(project)[0])
    services.cost_settings_update(project=project, actor=alice, spike_min_usd=Decimal("50"))
    for i in range(8 * 24):
        moment = START + timedelta(hours=i)
        spikes.detect_hour(project, moment.date(), moment.hour)
    assert CostSpike.objects.count() == 0  # $40 is below this project's minimum


def test_a_spike_is_sent_signed_to_an_allowlisted_webhook_and_by_email(project, alice, receiver, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    base, got = receiver
    with pytest.raises(ValidationError):  # not on the allowlist yet
        services.cost_settings_update(project=project, actor=alice, webhook_url=f"{base}/hooks/costs")
    project_services.project_update(project=project, actor=alice, webhook_allowlist=[f"{base}/hooks/"])
    services.cost_settings_update(project=project, actor=alice, webhook_url=f"{base}/hooks/costs",
                                  alert_emails=["finops@example.com"])
    spike = CostSpike.objects.create(project=project, period="hour", day=date(2026, 11, 22), hour=14,
                                     scope="agent", value="bot", spend_nanos=40_000_000_000,
                                     baseline_nanos=2_000_000_000, factor=Decimal("3"))
    spike_notify.apply(args=[spike.pk])

    [(path, headers, body)] = got
    assert path == "/hooks/costs"
    project.refresh_from_db()
    assert notify.verify(project.webhook_secret, body, headers["X-Controlplane-Signature"])
    assert not notify.verify("another secret", body, headers["X-Controlplane-Signature"])
    payload = json.loads(body)
    assert (payload["type"], payload["scope"], payload["value"], payload["spend_usd"]) == (
        "cost.spike", "agent", "bot", "40.000000000")
    [email] = mail.outbox
    assert email.to == ["finops@example.com"] and "$40.00" in email.subject
    spike.refresh_from_db()
    assert spike.webhook_status == "204" and spike.email_status.startswith("sent")

    spike_notify.apply(args=[spike.pk])  # a retry of the task sends neither twice
    assert len(got) == 1 and len(mail.outbox) == 1


def test_a_webhook_url_off_the_allowlist_is_never_called(project, alice, receiver):
    base, got = receiver
    project_services.project_update(project=project, actor=alice, webhook_allowlist=[f"{base}/hooks/"])
    services.cost_settings_update(project=project, actor=alice, webhook_url=f"{base}/hooks/costs")
    project_services.project_update(project=project, actor=alice, webhook_allowlist=[])  # removed since
    spike = CostSpike.objects.create(project=project, period="day", day=date(2026, 11, 22), scope="project",
                                     value="", spend_nanos=1, baseline_nanos=0, factor=Decimal("3"))
    spike_notify.apply(args=[spike.pk])
    spike.refresh_from_db()
    assert got == [] and spike.webhook_status == "refused: not on the allowlist"


def test_allowlist_prefixes_match_hosts_exactly():
    from apps.projects.models import url_allowed

    assert url_allowed("https://hooks.example.com/x", ["https://hooks.example.com"])
    assert not url_allowed("https://hooks.example.com.evil.net/x", ["https://hooks.example.com"])
    assert not url_allowed("https://hooks.example.com.evil.net/x", ["https://hooks.example.com/"])
    assert url_allowed("https://a.example/team/1", ["https://a.example/team/"])
    assert not url_allowed("https://a.example/other", ["https://a.example/team/"])
