"""Celery tasks of costs: thin wrappers (the logic is in ``rederive``, ``spikes`` and ``notify``)."""
from __future__ import annotations

import logging

from celery import shared_task

from apps.projects.models import Project

from . import notify, spikes
from .models import BudgetAlert, CostSettings, CostSpike, usd, usd_text

logger = logging.getLogger(__name__)

REDERIVE_DAYS_AFTER_TZ_CHANGE = 400


@shared_task(name="budgets.rederive", ignore_result=True)
def costs_rederive(project_id: int, days: int = REDERIVE_DAYS_AFTER_TZ_CHANGE) -> dict:
    """Re-derive a project's costs (after its time zone changed: every call's day moves)."""
    from .rederive import default_range, rederive

    project = Project.objects.get(pk=project_id)
    since, until = default_range(project, days)
    report = rederive(project, since=since, until=until)
    logger.info("costs: re-derived %s %s..%s: %s", project.slug, since, until, report or "no difference")
    return report


@shared_task(name="budgets.spikes_detect", ignore_result=True)
def spikes_detect() -> int:
    """Beat: judge the current and the previous hour of every project with spend."""
    return spikes.detect_recent()


@shared_task(name="budgets.spike_notify", bind=True, ignore_result=True, max_retries=5, default_retry_delay=60)
def spike_notify(self, spike_id: int) -> None:
    """Send a spike's webhook and email (each once; a failed webhook is retried with back-off)."""
    spike = CostSpike.objects.select_related("project").get(pk=spike_id)
    cfg = CostSettings.objects.filter(project=spike.project).first()
    if cfg is None:
        return
    payload = {"type": "cost.spike", "project": spike.project.slug, "period": spike.period,
               "day": spike.day.isoformat(), "hour": spike.hour, "scope": spike.scope, "value": spike.value,
               "spend_usd": str(spike.spend_usd), "baseline_usd": str(spike.baseline_usd),
               "factor": str(spike.factor), "detected_at": spike.detected_at.isoformat(), "id": spike.pk}
    if cfg.webhook_url and not spike.webhook_status.startswith(("2", "refused")):
        status = notify.post_webhook(spike.project, cfg.webhook_url, payload)
        CostSpike.objects.filter(pk=spike.pk).update(webhook_status=status[:200])
        if status.startswith("error"):
            raise self.retry(countdown=60 * 2 ** self.request.retries)
    if cfg.alert_emails and not spike.email_status:
        who = f"{spike.scope} {spike.value}" if spike.value else "the project"
        when = f"{spike.day} {spike.hour:02d}:00" if spike.hour is not None else str(spike.day)
        status = notify.send_email(
            cfg.alert_emails, f"[controlplane] Spend spike in {spike.project.slug}: ${spike.spend_usd:.2f}",
            f"{who} spent ${spike.spend_usd} in the {spike.period} {when} ({spike.project.time_zone}), against a "
            f"baseline of ${spike.baseline_usd} (threshold {spike.factor}x).")
        CostSpike.objects.filter(pk=spike.pk).update(email_status=status[:200])


@shared_task(name="budgets.reservations_expire", ignore_result=True)
def reservations_expire() -> int:
    """Beat: charge in full and close the reservations past their time to live."""
    from .ledger import expire_due

    return expire_due()


@shared_task(name="budgets.alert_notify", bind=True, ignore_result=True, max_retries=5, default_retry_delay=60)
def budget_alert_notify(self, alert_id: int) -> None:
    """Send a crossed threshold's webhook and email (each once; a failed webhook is retried)."""
    alert = BudgetAlert.objects.select_related("project", "budget").get(pk=alert_id)
    cfg = CostSettings.objects.filter(project=alert.project).first()
    if cfg is None:
        return
    budget = alert.budget
    payload = {"type": "budget.threshold", "project": alert.project.slug, "budget": budget.name,
               "budget_id": budget.pk, "scope": budget.scope, "value": budget.value, "period": budget.period,
               "period_start": alert.period_start.isoformat(), "threshold_percent": alert.threshold,
               "spent_usd": usd_text(alert.spent_nanos), "cap_usd": usd_text(alert.cap_nanos), "hard": budget.hard,
               "created_at": alert.created_at.isoformat(), "id": alert.pk}
    if cfg.webhook_url and not alert.webhook_status.startswith(("2", "refused")):
        status = notify.post_webhook(alert.project, cfg.webhook_url, payload)
        BudgetAlert.objects.filter(pk=alert.pk).update(webhook_status=status[:200])
        if status.startswith("error"):
            raise self.retry(countdown=60 * 2 ** self.request.retries)
    if cfg.alert_emails and not alert.email_status:
        status = notify.send_email(
            cfg.alert_emails, f"[controlplane] Budget {budget.name} in {alert.project.slug} at {alert.threshold}%",
            f"Budget {budget.name} ({budget.scope} {budget.value}, {budget.period} from {alert.period_start}) has "
            f"spent ${usd(alert.spent_nanos)} of its ${usd(alert.cap_nanos)} cap ({alert.threshold}% crossed).")
        BudgetAlert.objects.filter(pk=alert.pk).update(email_status=status[:200])
