"""Signals for apps above traces (costs, evals, the queue, the pages) to react to the run log without
traces importing them.

* ``spans_projected(sender=Run, project_id, changes: list[SpanChange], reattributed: list[Run], at_end)``: sent
  by the projection *inside* its transaction, once per group of records it applied, after every record
  is applied and before the runs are saved: ``changes`` holds every span whose effective form (span +
  late updates) changed; ``reattributed`` every run that existed before the group and whose
  attribution (``Run.attribution``: agent, version, end user, key) the group changed (OTLP's root
  span, naming the agent, often arrives after its model calls). A receiver that writes (a cost rollup)
  writes in the same transaction, so what it derives is exact: it commits with the spans or not at
  all, and a re-sent span that changes nothing is not in ``changes``. A receiver may move a run's cost
  (``Run.add_cost``), which the projection then saves with the run. ``at_end(fn)`` has ``fn()`` called
  last in the group, after the runs are saved: writes to rows every projection shares (a day's
  rollup) go there, so that concurrent projections wait on each other's row locks only for the
  moment before commit, not for the rest of the group. A receiver that raises fails the
  projection of those records (they are retried, then set aside as dead records): receivers must be
  correct and cheap.
* ``runs_finishing(sender=Run, project_id, runs: list[Run])``: sent by the projection *inside* its
  transaction, after the runs are saved, with the runs a ``run.finish`` record of this group touched,
  as they now stand (their outcome settled). A receiver that writes commits with the finish or not at
  all: the place for an outbox row (evals after each run) that must not be lost between the commit
  and a receiver of ``run_finished``. A re-sent finish sends a run again: receivers are idempotent.
* ``run_changed(sender=Run, run, new_span_ids, updated_span_ids)``: after commit, a run or its spans
  changed (for live pages). A failing receiver is logged and never undoes or stalls ingest.
* ``run_finished(sender=Run, run)``: after commit, a run reached a terminal status (including LOST,
  from housekeeping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.dispatch import Signal

if TYPE_CHECKING:
    from .models import Run


@dataclass(frozen=True)
class SpanChange:
    """One span's effective form before and after a projection (``before`` None: a new span)."""

    run: Run
    span_pk: int
    span_id: str
    before: dict | None
    after: dict


spans_projected = Signal()
run_changed = Signal()
run_finished = Signal()
runs_finishing = Signal()
