"""Housekeeping of the run log, run by beat (apps/traces/tasks.py):

* ``runs_mark_lost``: a RUNNING run that has had no new span for TRACES_LOST_AFTER_MINUTES becomes
  LOST (``error_code="run_lost"``); a span that arrives later brings it back to RUNNING (the
  projection does that). Quiet is measured against what has been projected: while the inbox is
  behind, the deadline moves back with it, so a backlog never makes a live run look lost.
* ``runs_purge_expired``: runs older than their project's retention (``Project.retention_days``, else
  TRACES_RETENTION_DAYS; none: kept forever) are deleted with their spans, span updates and tool
  calls, in transactions of at most TRACES_RETENTION_CHUNK_ROWS rows, so neither the tables nor the
  projection are locked for long. Each chunk is audited in its own transaction (one audit event per
  chunk that deleted something).

* ``stats_refresh``: where PostgreSQL runs with autovacuum off, ANALYZE the run log's tables whose
  statistics went stale (autovacuum's own rule), so the projection's plans stay index probes.

The first two send what the projection sends (live broadcasts; ``run_changed`` / ``run_finished`` for a run
that became LOST), so apps above traces see a lost run like any other finished one.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Min
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.audit.services import Actor, audit_record
from apps.projects.models import Project

from .live import RunChanges, publish_changes
from .models import LOST_ERROR_CODE, IngestBatch, Run, Span, SpanUpdate, ToolCall

logger = logging.getLogger(__name__)

LOST_CHUNK = 500
RETENTION_RUNS_PER_CHUNK = 200


def _budget_deadline(budget_seconds: float | None) -> float:
    return time.monotonic() + (budget_seconds if budget_seconds is not None
                               else settings.TRACES_HOUSEKEEPING_BUDGET_SECONDS)


def lost_cutoff(now=None):
    """Runs whose last span was projected before this moment are lost.

    It is TRACES_LOST_AFTER_MINUTES before the moment up to which everything accepted has been
    projected: now, or the acceptance of the oldest batch still waiting in the inbox (its spans may
    belong to any run). A run quiet since before that cutoff received no span in N minutes of
    accepted traffic, however far behind the projection is."""
    now = now or timezone.now()
    oldest_waiting = (IngestBatch.objects
                      .filter(status__in=[IngestBatch.Status.PENDING, IngestBatch.Status.PROCESSING])
                      .aggregate(t=Min("created_at"))["t"])
    reference = min(now, oldest_waiting) if oldest_waiting else now
    return reference - timedelta(minutes=settings.TRACES_LOST_AFTER_MINUTES)


def runs_mark_lost(*, now=None, budget_seconds: float | None = None) -> int:
    """Mark quiet RUNNING runs LOST. Returns how many. Runs a projection holds locked are skipped
    (they are receiving spans right now)."""
    now = now or timezone.now()
    cutoff = lost_cutoff(now)
    minutes = settings.TRACES_LOST_AFTER_MINUTES
    deadline = _budget_deadline(budget_seconds)
    marked = 0
    while time.monotonic() < deadline:
        changes = RunChanges()
        with transaction.atomic():
            quiet = (Run.objects.filter(status=Run.Status.RUNNING)
                     .annotate(activity=Coalesce("last_span_at", "created_at")).filter(activity__lt=cutoff))
            runs = list(quiet.order_by("pk").select_for_update(skip_locked=True, of=("self",))[:LOST_CHUNK])
            if not runs:
                break
            for run in runs:
                run.status = Run.Status.LOST
                run.error_code = LOST_ERROR_CODE
                run.error_details = {
                    "message": f"no new span for {minutes:g} minutes",
                    "last_activity_at": run.activity.isoformat(),
                    "marked_at": now.isoformat(),
                }
                run.updated_at = now
                changes.runs[run.pk] = run
                changes.finished.add(run.pk)
            Run.objects.bulk_update(runs, ["status", "error_code", "error_details", "updated_at"])
        marked += len(runs)
        publish_changes(changes)
        if len(runs) < LOST_CHUNK:
            break
    if marked:
        logger.info("marked %s quiet runs LOST (no span since %s)", marked, cutoff.isoformat())
    return marked


def retention_days(project: Project) -> int | None:
    """The project's retention in days, or None to keep its runs forever."""
    if project.retention_days:
        return project.retention_days
    return settings.TRACES_RETENTION_DAYS or None


def _purge_chunk(project: Project, cutoff, limit: int, days: int, counts: dict[str, int]) -> bool:
    """One transaction: delete up to ``limit`` rows that belong to expired runs (tool calls, span
    updates, spans), and the runs themselves once nothing of theirs is left, and audit what it deleted
    as the transaction's last write (so a deletion is never committed without its audit row, and the
    audit chain's lock is held only until this commit). False when nothing was left to delete."""
    chunk = dict.fromkeys(counts, 0)
    with transaction.atomic():
        run_ids = list(Run.objects.filter(project=project, started_at__lt=cutoff, updated_at__lt=cutoff)
                       .order_by("pk").select_for_update(skip_locked=True)
                       .values_list("pk", flat=True)[:RETENTION_RUNS_PER_CHUNK])
        if not run_ids:
            return False
        budget = limit
        for model, name in ((ToolCall, "tool_calls"), (SpanUpdate, "span_updates"), (Span, "spans")):
            pks = list(model.objects.filter(run_id__in=run_ids).order_by().values_list("pk", flat=True)[:budget])
            if pks:
                # A plain DELETE ... WHERE id IN (...): these rows have no dependants left (tool calls
                # go first), so Django's collector would only load them to find none.
                chunk[name] += model.objects.filter(pk__in=pks)._raw_delete(model.objects.db)
                budget -= len(pks)
            if budget <= 0:
                break
        else:
            # Everything of these runs is gone: delete the runs (through the ORM, so that child runs
            # are unlinked and models of other apps that point at a run follow their on_delete).
            chunk["runs"] += Run.objects.filter(pk__in=run_ids).delete()[1].get(Run._meta.label, 0)
        if any(chunk.values()):
            audit_record(actor=Actor.system("retention"), action="traces.retention_purged",
                         object_type="projects.project", object_id=project.pk, object_repr=str(project),
                         project_id=project.pk, project_slug=project.slug,
                         after={"retention_days": days, "cutoff": cutoff.isoformat(), **chunk})
    for key, value in chunk.items():
        counts[key] += value
    return True


def runs_purge_expired(*, now=None, budget_seconds: float | None = None, chunk_rows: int | None = None
                       ) -> dict[str, int]:
    """Delete runs past their project's retention, in bounded chunks, within the time budget (the
    next pass continues). Returns the totals deleted."""
    now = now or timezone.now()
    deadline = _budget_deadline(budget_seconds)
    limit = chunk_rows or settings.TRACES_RETENTION_CHUNK_ROWS
    totals = dict.fromkeys(["runs", "spans", "span_updates", "tool_calls"], 0)
    projects = Project.objects.all() if settings.TRACES_RETENTION_DAYS else Project.objects.filter(
        retention_days__isnull=False)
    for project in projects.order_by("pk"):
        days = retention_days(project)
        if not days:
            continue
        cutoff = now - timedelta(days=days)
        counts = dict.fromkeys(totals, 0)
        try:
            while time.monotonic() < deadline and _purge_chunk(project, cutoff, limit, days, counts):
                pass
        finally:
            if any(counts.values()):
                logger.info("retention: project %s, deleted %s", project.slug, counts)
            for key, value in counts.items():
                totals[key] += value
        if time.monotonic() >= deadline:
            break
    return totals


# The run log's tables, whose statistics the projection's plans depend on (index probes per key
# rather than hash joins over whole tables).
STATS_TABLES = (Span, SpanUpdate, ToolCall, Run, IngestBatch)


def stale_tables(counts, threshold: float, scale: float, *, force: bool = False) -> list[str]:
    """Of (table, rows changed since its last ANALYZE, rows), those autoanalyze would analyze."""
    return sorted(name for name, changed, rows in counts if force or changed > threshold + scale * max(rows, 0))


def stats_refresh(*, force: bool = False) -> list[str]:
    """ANALYZE the run log's tables whose statistics are stale, when PostgreSQL will not.

    Autovacuum (on by default) keeps planner statistics current. A server running with it off leaves
    a table that grew from empty without any: the planner then takes a million-row span table for a
    few pages, joins whole tables instead of probing indexes, and the projection slows down as the
    table grows (measured in bench/RESULTS.md). With autovacuum off, this
    does what autoanalyze would: a table whose rows changed since its last ANALYZE by more than
    autovacuum_analyze_threshold + autovacuum_analyze_scale_factor x its rows is analyzed. Returns the
    tables analyzed. Nothing elsewhere (SQLite) or with autovacuum on, unless ``force``.
    """
    from django.db import connection

    if connection.vendor != "postgresql":
        return []
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('autovacuum')::boolean, "
                       "current_setting('autovacuum_analyze_threshold')::float, "
                       "current_setting('autovacuum_analyze_scale_factor')::float")
        autovacuum, threshold, scale = cursor.fetchone()
        if autovacuum and not force:
            return []
        tables = [m._meta.db_table for m in STATS_TABLES]
        cursor.execute("SELECT s.relname, s.n_mod_since_analyze, greatest(c.reltuples, 0) FROM pg_stat_user_tables s "
                       "JOIN pg_class c ON c.oid = s.relid WHERE s.relname = ANY(%s)", [tables])
        stale = stale_tables(cursor.fetchall(), threshold, scale, force=force)
        for name in stale:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(name)}")
    if stale:
        logger.info("analyzed %s (autovacuum is off)", ", ".join(stale))
    return stale
