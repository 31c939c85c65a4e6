"""What approvals tell the live side: every change of an approval is published, after its transaction
commits, to the approval's own group (an agent's long-poll or socket waits there) and to its project's
group (the inbox, the overview). The database stays the truth: a waiter subscribes first and then reads
the row, so a decision between the two is not missed, and a lost message only delays an answer."""
from __future__ import annotations

from django.db import transaction

from apps.common import live


def approval_group(approval_pk: int) -> str:
    return f"approvals.approval.{approval_pk}"


def project_group(project_id: int) -> str:
    return f"approvals.project.{project_id}"


def publish_changed(*, approval_pk: int, project_id: int, state: str) -> None:
    """After commit: the approval changed (created, decided, consumed, expired, cancelled)."""
    message = {"type": "approval.changed", "approval_pk": approval_pk, "project_id": project_id, "state": state}

    def send() -> None:
        live.publish_many([(approval_group(approval_pk), message), (project_group(project_id), message)])

    transaction.on_commit(send, robust=True)
