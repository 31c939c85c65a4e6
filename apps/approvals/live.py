"""What approvals tell the live side: every change of an approval is published, after its transaction
commits, to the approval's own group (an agent's long-poll or socket waits there) and to its project's
group (the inbox, the overview). The database stays the truth: a waiter subscribes first and then reads
the row, so a decision between the two is not missed, and a lost message only delays an answer."""
from __future__ import annotations

from django.db import transaction

from apps.common import live


def approval_group(public_id: str) -> str:
    """By the id agents know: a waiter subscribes before it has read the row."""
    return f"approvals.approval.{public_id}"


def project_group(project_id: int) -> str:
    return f"approvals.project.{project_id}"


def publish_changed(approval, state: str | None = None) -> None:
    """After commit: the approval changed (created, decided, consumed, expired, cancelled)."""
    message = {"type": "approval.changed", "approval_pk": approval.pk, "project_id": approval.project_id,
               "state": state or approval.state}
    groups = (approval_group(approval.public_id), project_group(approval.project_id))

    def send() -> None:
        live.publish_many([(group, message) for group in groups])

    transaction.on_commit(send, robust=True)
