"""Celery tasks of the evals: after each run, batch jobs' chunks and crons, and the beat's sweep of
what waits."""
from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from . import jobs, services


@shared_task(name="evals.after_run", queue="default", ignore_result=True, acks_late=True,
             reject_on_worker_lost=True)
def after_run(run_pk: int) -> dict:
    """Evaluate one finished run (its configurations' evaluators); nothing to claim: nothing done."""
    result = services.after_run_step(run_pk=run_pk)
    if result["not_before"] is not None:  # delivered early: come back when due
        after_run.apply_async((run_pk,), countdown=max((result["not_before"] - timezone.now()).total_seconds(), 0))
    return {k: v for k, v in result.items() if k != "not_before"}


@shared_task(name="evals.job_chunk", queue="default", ignore_result=True, acks_late=True,
             reject_on_worker_lost=True)
def job_chunk(lane_pk: int) -> dict:
    """The next chunk of a batch's lane (it enqueues the one after); nothing to claim: nothing done."""
    return jobs.job_chunk_step(lane_pk=lane_pk)


@shared_task(name=jobs.SCHEDULED_TASK, queue="default", ignore_result=True)
def job_scheduled(job_pk: int) -> int | None:
    """An eval job's cron fired (beat's ``PeriodicTask``)."""
    batch = jobs.job_scheduled(job_pk=job_pk)
    return batch.pk if batch else None


@shared_task(name="evals.sweep", queue="default", ignore_result=True)
def sweep() -> dict:
    return {"after_run": services.pending_sweep(), "jobs": jobs.job_sweep()}
