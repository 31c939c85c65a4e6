"""The evals' reads, scoped to what the caller may see (``traces.selectors.run_get`` for one run; a
run's rows are read only once the caller may see the run)."""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from django.utils import timezone

from apps.traces.models import Run

from . import evaluators
from .models import EvalConfig, EvalJob, EvalJobRun, EvalScore


def score_json(s: EvalScore) -> dict:
    return {
        "id": s.pk, "evaluator": s.evaluator, "version": s.version, "span_id": s.span_id or None,
        "score": s.score, "label": s.label, "passed": s.passed, "explanation": s.explanation,
        "outcome": s.outcome, "error_code": s.error_code or None, "details": s.details, "source": s.source,
        "user": s.user.username if s.user_id else None, "created_at": s.created_at, "updated_at": s.updated_at,
    }


def run_scores(run: Run) -> list[dict]:
    """Every score of a run (a run the caller may see), evaluator errors included."""
    return [score_json(s) for s in EvalScore.objects.filter(run=run).select_related("user")
            .order_by("evaluator", "span_id", "version")]


def runs_scores(run_pks: list[int]) -> dict[int, list[dict]]:
    """For a list of runs (a page the caller may see): their run-level scores, compact, in one query."""
    out: dict[int, list[dict]] = defaultdict(list)
    for row in (EvalScore.objects.filter(run_id__in=run_pks, span_id="")
                .order_by("evaluator", "version").values("run_id", "evaluator", "version", "score", "label",
                                                         "passed", "outcome", "source")):
        out[row["run_id"]].append(row)
    return out


def configs_of_project(project) -> list[EvalConfig]:
    return list(EvalConfig.objects.filter(project=project).order_by("name"))


def registry() -> list[dict]:
    return [{"name": e.name, "version": e.version, "description": e.description,
             "deterministic": e.deterministic, "config_schema": e.config_schema}
            for e in sorted(evaluators.REGISTRY.values(), key=lambda e: e.name)]


def jobs_of_project(project) -> list[EvalJob]:
    return list(EvalJob.objects.filter(project=project).select_related("periodic_task__crontab").order_by("name"))


def job_next_run_at(job: EvalJob) -> datetime | None:
    """When beat fires the job's cron next (None: no schedule, or disabled)."""
    task = job.periodic_task
    if task is None or not task.enabled or task.crontab is None:
        return None
    now = timezone.now()
    # Celery's estimate is the time left from its own now: a few microseconds off; crons are per minute.
    at = now + task.crontab.schedule.remaining_estimate(task.last_run_at or now) + timedelta(seconds=30)
    return at.replace(second=0, microsecond=0)


def job_run_json(batch: EvalJobRun) -> dict:
    return {"id": batch.pk, "job": batch.job_id, "state": batch.state, "trigger": batch.trigger,
            "started_by": batch.started_by.username if batch.started_by_id else None,
            "evaluators": batch.evaluators, "filter": batch.filter, "window_start": batch.window_start,
            "window_end": batch.window_end, "total": batch.total, "scanned": batch.scanned,
            "evaluated": batch.evaluated, "scores_added": batch.scores_added, "errors": batch.errors,
            "chunks": batch.chunks, "progress": batch.progress, "last_error": batch.last_error,
            "created_at": batch.created_at, "finished_at": batch.finished_at}


def job_runs(job: EvalJob, limit: int = 50) -> list[dict]:
    """A job's latest batches, newest first."""
    return [job_run_json(b) for b in EvalJobRun.objects.filter(job=job).select_related("started_by")[:limit]]
