"""What the evals tell the live side: a batch's progress, published after each chunk's commit to its
project's group (the evals page re-reads its batches). The database stays the truth: a lost message only
delays the page."""
from __future__ import annotations

from django.db import transaction

from apps.common import live


def project_group(project_id: int) -> str:
    return f"evals.project.{project_id}"


def publish_progress(batch) -> None:
    """After commit: a batch moved (a chunk committed, it finished, failed or was cancelled)."""
    message = {"type": "evals.job_progress", "job_run_pk": batch.pk, "job_pk": batch.job_id,
               "project_id": batch.project_id, "state": batch.state, "scanned": batch.scanned, "total": batch.total,
               "evaluated": batch.evaluated, "scores_added": batch.scores_added, "errors": batch.errors}
    transaction.on_commit(lambda: live.publish(project_group(batch.project_id), message), robust=True)
