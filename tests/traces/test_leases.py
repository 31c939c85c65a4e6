"""Leases are short and renewed while a worker projects, and a fault inside the retry path leaves the
batch leased for the sweeper instead of raising out of the task."""
from __future__ import annotations

import time

import pytest
from django.db import OperationalError
from django.utils import timezone

from apps.traces import inbox, projection, services
from apps.traces.models import IngestBatch, Span

from .helpers import accept, drain, span, start

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_working_projection_keeps_renewing_its_lease_and_an_ended_one_lets_it_expire(project, make_key, settings):
    settings.TRACES_LEASE_SECONDS = 1
    key = make_key(project)[0]
    accept(project, key, [start("r1")])
    claimed = inbox.claim(None, 10)
    assert [b.status for b in claimed] == ["processing"]
    with inbox.Heartbeat([b.pk for b in claimed]):
        time.sleep(2.5)  # longer than two leases: only renewals keep it
        assert IngestBatch.objects.get().lease_expires_at > timezone.now()
        assert inbox.claim(None, 10) == []  # nobody else may take it meanwhile
    time.sleep(1.2)  # the heartbeat stopped (a killed worker's would): the lease runs out
    assert [b.pk for b in inbox.claim(None, 10)] == [claimed[0].pk]


def test_seconds_until_leases_expire_is_what_a_starting_worker_waits(project, make_key, settings):
    settings.TRACES_LEASE_SECONDS = 15
    key = make_key(project)[0]
    assert services.seconds_until_leases_expire() is None
    accept(project, key, [start("r1")])
    inbox.claim(None, 10)
    assert 13 < services.seconds_until_leases_expire() <= 15


def test_a_database_fault_while_recording_a_retry_leaves_the_lease_and_raises_nothing(project, make_key,
                                                                                      monkeypatch):
    key = make_key(project)[0]
    accept(project, key, [start("r1"), span("r1", span_id="s1")])

    def down(*args, **kwargs):
        raise OperationalError("the database went away")

    monkeypatch.setattr(projection, "apply_batches", down)  # the projection fails for the database...
    monkeypatch.setattr(inbox, "_retry_later", down)  # ...and so does recording the retry
    assert services.inbox_step() == 1  # no exception out of the task body
    batch = IngestBatch.objects.get()
    assert batch.status == "processing" and batch.lease_expires_at is not None  # the sweeper's, once it expires

    monkeypatch.undo()
    IngestBatch.objects.update(lease_expires_at=timezone.now())
    drain()
    assert Span.objects.filter(span_id="s1").exists()
