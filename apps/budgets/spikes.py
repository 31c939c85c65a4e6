"""Spend spikes: an hour, or a day, far above its trailing baseline, recorded once.

For each scope with spend in the hour (the project, each agent, each end user), the hour's spend is
compared with the median of the same hour over the project's ``spike_baseline_days`` days before
(days without spend count as zero, days before the scope was first seen in that window do not
count, and fewer than ``MIN_HISTORY_DAYS`` of history give no verdict). Above ``spike_factor`` times
that median and at least ``spike_min_usd``, it is a spike; the day is judged the same way against the
median of the days before. A spike is a row (unique per scope and period: found again, it is not
recorded twice), not an audit event (no person changed anything); its webhook and email go after
commit (``notify``). Read from ``CostHour`` only.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.projects.models import Project

from .models import CostHour, CostSettings, CostSpike, nanos

MIN_HISTORY_DAYS = 3


def _settings(project: Project) -> CostSettings:
    return CostSettings.objects.filter(project=project).first() or CostSettings(project=project)


def detect_hour(project: Project, day: date, hour: int) -> list[CostSpike]:
    """Judge one of the project's hours (and its day so far); returns the spikes newly recorded."""
    cfg = _settings(project)
    n = cfg.spike_baseline_days
    rows = list(CostHour.objects.filter(project=project, day__gte=day - timedelta(days=n), day__lte=day)
                .values_list("day", "hour", "scope", "value", "cost_nanos"))
    hourly: dict[tuple[str, str], dict[tuple[date, int], int]] = defaultdict(dict)
    daily: dict[tuple[str, str], dict[date, int]] = defaultdict(lambda: defaultdict(int))
    for d, h, scope, value, cost in rows:
        hourly[(scope, value)][(d, h)] = cost
        if d < day or h <= hour:
            daily[(scope, value)][d] += cost
    minimum, factor = nanos(cfg.spike_min_usd), cfg.spike_factor
    found = []
    for key, by_hour in hourly.items():
        spend = by_hour.get((day, hour))
        if not spend:
            continue
        first = min(d for d, _ in by_hour)
        past_days = [day - timedelta(days=i) for i in range(1, n + 1) if day - timedelta(days=i) >= first]
        if len(past_days) < MIN_HISTORY_DAYS:
            continue
        baseline = statistics.median(by_hour.get((d, hour), 0) for d in past_days)
        if spend >= minimum and spend > factor * Decimal(baseline):
            found.append((CostSpike.Period.HOUR, hour, key, spend, int(baseline)))
        day_spend = daily[key].get(day, 0)
        day_baseline = statistics.median(daily[key].get(d, 0) for d in past_days)
        if day_spend >= minimum and day_spend > factor * Decimal(day_baseline):
            found.append((CostSpike.Period.DAY, None, key, day_spend, int(day_baseline)))
    return _record(project, day, found, factor)


def _record(project: Project, day: date, found: list, factor: Decimal) -> list[CostSpike]:
    created = []
    for period, hour, (scope, value), spend, baseline in found:
        try:
            with transaction.atomic():
                spike = CostSpike.objects.create(project=project, period=period, day=day, hour=hour, scope=scope,
                                                 value=value, spend_nanos=spend, baseline_nanos=baseline,
                                                 factor=factor)
        except IntegrityError:
            continue  # recorded already: a spike is recorded once
        created.append(spike)
    if created:
        from .tasks import spike_notify

        for spike in created:
            transaction.on_commit(lambda pk=spike.pk: spike_notify.delay(pk))
    return created


def detect_recent(now: datetime | None = None) -> int:
    """Beat: judge, in every project with spend in it, the current hour and the one before (which
    may have grown since last judged). Returns the number of spikes recorded."""
    now = now or timezone.now()
    count = 0
    for project in Project.objects.all():
        local = now.astimezone(ZoneInfo(project.time_zone))
        for moment in (local - timedelta(hours=1), local):
            if CostHour.objects.filter(project=project, day=moment.date(), hour=moment.hour).exists():
                count += len(detect_hour(project, moment.date(), moment.hour))
    return count
