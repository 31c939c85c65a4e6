"""Sending a spike or a threshold out: a signed webhook (``projects.webhooks``, the header format is
there and in the README) and an email."""
from __future__ import annotations

from django.conf import settings
from django.core.mail import send_mail

from apps.projects.webhooks import post_webhook, sign, verify  # noqa: F401 - the budgets' webhooks are these


def send_email(recipients: list[str], subject: str, body: str) -> str:
    if not recipients:
        return ""
    sent = send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
    return f"sent to {sent and len(recipients)}"
