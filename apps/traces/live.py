"""What the projection tells the rest of the system once its transaction has committed: a broadcast
per run touched (to the live groups that pages subscribe to) and the ``run_changed`` / ``run_finished``
signals (see ``signals``). Housekeeping sends the same for a run it declares LOST."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from apps.common import live

from . import signals
from .models import Run

logger = logging.getLogger(__name__)


def project_runs_group(project_id: int) -> str:
    """The live group of one project's run list."""
    return f"traces.project.{project_id}.runs"


def run_group(run_pk: int) -> str:
    """The live group of one run's page."""
    return f"traces.run.{run_pk}"


@dataclass
class RunChanges:
    """What one projection changed, for broadcasts and signals after commit."""

    runs: dict[int, Run] = field(default_factory=dict)
    new_spans: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    updated_spans: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    finished: set[int] = field(default_factory=set)

    def merge(self, other: RunChanges) -> None:
        self.runs.update(other.runs)
        for pk, ids in other.new_spans.items():
            self.new_spans[pk].extend(ids)
        for pk, ids in other.updated_spans.items():
            self.updated_spans[pk].extend(ids)
        self.finished |= other.finished


def run_summary(run: Run) -> dict:
    return {
        "id": run.run_id, "status": run.status, "agent": run.agent_name, "end_user": run.end_user,
        "session_id": run.session_id, "started_at": run.started_at.isoformat() if run.started_at else None,
        "ended_at": run.ended_at.isoformat() if run.ended_at else None, "span_count": run.span_count,
        "error_span_count": run.error_span_count, "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
    }


def publish_changes(changes: RunChanges) -> None:
    """Broadcast and signal what changed (the transaction has committed: the data is readable)."""
    if not changes.runs:
        return
    messages = []
    for pk, run in changes.runs.items():
        summary = run_summary(run)
        # run_pk and project_id let a consumer re-check, per message, that its person may see the run.
        ids = {"run_pk": pk, "project_id": run.project_id}
        messages.append((project_runs_group(run.project_id), {"type": "run.updated", **ids, "run": summary}))
        messages.append((run_group(pk), {"type": "run.updated", **ids, "run": summary,
                                         "new_spans": changes.new_spans.get(pk, []),
                                         "updated_spans": changes.updated_spans.get(pk, [])}))
        if run.parent_run_id:  # a parent's page shows its child runs live
            messages.append((run_group(run.parent_run_id), {"type": "run.updated", **ids, "run": summary}))
    live.publish_many(messages)
    for pk, run in changes.runs.items():
        try:
            signals.run_changed.send(sender=Run, run=run, new_span_ids=changes.new_spans.get(pk, []),
                                     updated_span_ids=changes.updated_spans.get(pk, []))
            if pk in changes.finished:
                signals.run_finished.send(sender=Run, run=run)
        except Exception:  # noqa: BLE001 - a receiver's bug must not undo or stall ingest
            logger.exception("a receiver of a traces signal failed for run %s", pk)
