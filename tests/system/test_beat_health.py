"""``manage.py beat_health``, the beat service's health check: alive while beat has run an interval entry
recently (django-celery-beat writes each entry's last run to the database)."""
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

pytestmark = pytest.mark.django_db


def _entry(last_run_at):
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name="traces-inbox-sweep", task="traces.inbox_sweep", interval=every,
                                       last_run_at=last_run_at)


def test_a_beat_that_never_ran_is_unhealthy():
    with pytest.raises(CommandError, match="never"):
        call_command("beat_health")


def test_a_recent_run_is_healthy_and_an_old_one_is_not():
    entry = _entry(timezone.now() - timedelta(seconds=30))
    call_command("beat_health", "--within", "600")
    PeriodicTask.objects.filter(pk=entry.pk).update(last_run_at=timezone.now() - timedelta(seconds=700))
    with pytest.raises(CommandError, match="nothing in the last 600 s"):
        call_command("beat_health", "--within", "600")
