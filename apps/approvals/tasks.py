"""Celery tasks of approvals: the beat's sweep (deadlines, overdue reminders) and notifications."""
from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from apps.projects.webhooks import post_webhook

from . import selectors, services
from .models import Approval

logger = logging.getLogger(__name__)


@shared_task(name="approvals.sweep", ignore_result=True)
def sweep() -> dict:
    """Beat: expire approvals past their deadline; remind about pending ones past their overdue time
    (once each)."""
    now = timezone.now()
    expired = services.expire_due(now=now)
    overdue = 0
    for pk in Approval.objects.filter(state=Approval.State.PENDING, overdue_at__lte=now,
                                      renotified_at__isnull=True).values_list("pk", flat=True)[:500]:
        # A conditional update: two beats never remind twice.
        if Approval.objects.filter(pk=pk, renotified_at__isnull=True).update(renotified_at=now):
            notify.delay(pk, "approval.overdue")
            overdue += 1
    return {"expired": expired, "overdue": overdue}


@shared_task(name="approvals.notify", bind=True, ignore_result=True, max_retries=5, default_retry_delay=30)
def notify(self, approval_pk: int, event: str) -> None:
    """Send one event of an approval: the signed webhooks (the rule's and the agent's callback; retried
    with back-off while one fails, so a receiver may see an event twice: ``delivery`` tells them apart)
    and, for a request or an overdue reminder, the rule's emails (once)."""
    approval = Approval.objects.select_related("project", "rule").filter(pk=approval_pk).first()
    if approval is None:
        return
    payload = {"type": event, "delivery": f"{approval.public_id}:{event}", "project": approval.project.slug,
               "approval": selectors.approval_json(approval)}
    urls = [u for u in (approval.rule.webhook_url if approval.rule_id else "", approval.callback_url) if u]
    failed = []
    for url in dict.fromkeys(urls):
        status = post_webhook(approval.project, url, payload)
        if status.startswith("error"):
            failed.append(status)
    if approval.rule_id and approval.rule.notify_emails and event in ("approval.requested", "approval.overdue") \
            and self.request.retries == 0:
        what = "waits for approval" if event == "approval.requested" else "is still waiting for approval"
        try:
            send_mail(f"[controlplane] {approval.project.slug}: {approval.action} {what}",
                      f"{approval.summary or approval.action}\n\nRequested {approval.created_at:%Y-%m-%d %H:%M} UTC "
                      f"by {approval.agent_name or 'an agent'}{' for ' + approval.end_user if approval.end_user else ''}."
                      f"\nApproval {approval.public_id}: {settings.SITE_URL}/approvals/{approval.project.slug}/{approval.public_id}/",
                      settings.DEFAULT_FROM_EMAIL, approval.rule.notify_emails, fail_silently=False)
        except OSError as exc:
            logger.warning("approvals: email for %s failed: %s", approval.public_id, exc)
    if failed:
        logger.warning("approvals: webhook for %s %s failed: %s", approval.public_id, event, failed)
        raise self.retry(countdown=30 * 2 ** self.request.retries)

