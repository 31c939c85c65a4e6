"""Batch evals over history: eval jobs (project admins; audited), their cron kept as a beat
``PeriodicTask``, and the batches (``EvalJobRun``) walked in chunks.

A batch fixes its window, filter, evaluators and the run ids it may reach (``first_pk..last_pk``) when
it starts, and splits those ids into lanes (``EvalJobLane``, as many runs each) that workers walk side by
side, each in id order from its own cursor. A chunk is one claim and one commit:

- claim: a conditional update of the lane (not done, no live lease, the generation read, its batch
  running) that bumps the generation and sets a lease long enough for the chunk (judges' timeouts
  included);
- evaluate: the lane's next runs after its cursor, no writes (a judge calls the gateway over HTTP);
- commit: the scores, the lane's new cursor and the batch's counts in one transaction, and only while
  the lane's generation is still this claim's and the batch still runs (a cancelled, failed or
  taken-over chunk commits nothing). The last lane to finish finishes the batch.

So a redelivered or duplicated task finds nothing to claim (or takes the lane's next chunk, once), a
worker killed mid-chunk loses only that chunk's work (its lease expires and the beat's sweep resumes the
lane from its cursor), and running a batch again over the same runs adds no score: scores are unique per
run, span, evaluator and version.
"""
from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import re
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Max, Min, Q
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from apps.common.errors import ApiError, ErrorCode
from apps.projects.models import Project
from apps.projects.services import audit_change, update_audited
from apps.traces.models import Run

from . import live, runner
from .models import EvalJob, EvalJobLane, EvalJobRun, EvalScore, cron_fields

logger = logging.getLogger(__name__)

SCHEDULED_TASK = "evals.job_scheduled"


# --- jobs (project admins; audited) ----------------------------------------------------------------


def periodic_task_name(job: EvalJob) -> str:
    return f"evals.job.{job.pk}"


def _sync_schedule(job: EvalJob) -> None:
    """Keep the job's beat entry in step with it (in the caller's transaction): a cron and enabled, a
    ``PeriodicTask`` calling ``evals.job_scheduled``; otherwise none."""
    if not (job.schedule and job.enabled):
        if job.periodic_task_id:
            PeriodicTask.objects.filter(pk=job.periodic_task_id).delete()
            EvalJob.objects.filter(pk=job.pk).update(periodic_task=None)
            job.periodic_task = None
        return
    minute, hour, day_of_month, month_of_year, day_of_week = cron_fields(job.schedule)
    crontab, _ = CrontabSchedule.objects.get_or_create(
        minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year, day_of_week=day_of_week,
        timezone=settings.TIME_ZONE)
    task, _ = PeriodicTask.objects.update_or_create(
        name=periodic_task_name(job),
        defaults={"task": SCHEDULED_TASK, "args": json.dumps([job.pk]), "crontab": crontab, "interval": None,
                  "enabled": True, "description": f"Eval job {job.name!r} of project {job.project.slug}"})
    if job.periodic_task_id != task.pk:
        EvalJob.objects.filter(pk=job.pk).update(periodic_task=task)
        job.periodic_task = task


@transaction.atomic
def job_create(*, project: Project, actor, **fields) -> EvalJob:
    unknown = set(fields) - set(EvalJob.FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of an eval job."})
    job = EvalJob(project=project, **fields)
    job.full_clean(exclude=["project"])
    if EvalJob.objects.filter(project=project, name=job.name).exists():
        raise ValidationError({"name": "An eval job of this project has this name already."})
    job.save()
    _sync_schedule(job)
    audit_change(actor, project, "evals.job_created", job, after=job.as_dict())
    return job


@transaction.atomic
def job_update(*, job: EvalJob, actor, **changes) -> EvalJob:
    job = EvalJob.objects.select_for_update().select_related("project").get(pk=job.pk)
    job = update_audited(job, changes, EvalJob.FIELDS, lambda: job.full_clean(exclude=["project"]), actor,
                         "evals.job_updated")
    _sync_schedule(job)
    return job


@transaction.atomic
def job_delete(*, job: EvalJob, actor) -> None:
    audit_change(actor, job.project, "evals.job_deleted", job, before=job.as_dict())
    if job.periodic_task_id:
        PeriodicTask.objects.filter(pk=job.periodic_task_id).delete()
    job.delete()


# --- starting a batch --------------------------------------------------------------------------------


def _agent_regex(pattern: str) -> str | None:
    """The SQL prefilter of an agent glob (``*`` and ``?``); None where only fnmatch can tell ([...])."""
    if "[" in pattern:
        return None
    return "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + "$"


def _window_runs(project_id: int, flt: dict, start: datetime, end: datetime):
    """The window's runs as SQL can pick them (statuses, agent version, the agent glob's prefilter)."""
    runs = Run.objects.filter(project_id=project_id, started_at__gte=start, started_at__lt=end,
                              status__in=flt["statuses"])
    if flt["agent_version"]:
        runs = runs.filter(agent_version=flt["agent_version"])
    pattern = flt["agent_pattern"]
    if pattern:
        regex = _agent_regex(pattern)
        if regex is not None and not any(c in pattern for c in "*?"):
            runs = runs.filter(agent_name=pattern)
        elif regex is not None:
            runs = runs.filter(agent_name__regex=regex)
    return runs


def job_start(*, job: EvalJob, trigger: str, actor=None, window_start: datetime | None = None,
              window_end: datetime | None = None) -> EvalJobRun:
    """Start a batch of ``job`` (its first chunk is enqueued after commit). One batch of a job at a
    time: while one runs, 409 ``job_running``."""
    now = timezone.now()
    end = window_end or now
    start = window_start or end - timedelta(hours=job.window_hours)
    if start >= end:
        raise ApiError(ErrorCode.INVALID_REQUEST, "The window's start must be before its end.",
                       details={"window_start": ["must be before window_end."]})
    flt = job.filter_snapshot()
    window = _window_runs(job.project_id, flt, start, end)
    bounds = window.aggregate(first=Min("pk"), last=Max("pk"), n=Count("pk"))
    total = bounds["n"] or 0
    first_pk, last_pk = bounds["first"] or 0, bounds["last"] or 0
    specs = runner.specs_of(job.evaluators)
    size, lease = _chunk_plan(specs)
    try:
        with transaction.atomic():
            batch = EvalJobRun.objects.create(
                project_id=job.project_id, job=job, trigger=trigger, started_by=actor if trigger == "manual" else None,
                evaluators=job.evaluators, filter=flt, window_start=start, window_end=end,
                sample_below=_sample_below(job, window, flt), first_pk=first_pk, last_pk=last_pk, total=total)
            cuts = _lane_cuts(window, first_pk, last_pk, total, size)
            lanes = EvalJobLane.objects.bulk_create(
                EvalJobLane(batch=batch, index=i, lo_pk=lo, hi_pk=hi, cursor=lo, enqueued_at=now)
                for i, (lo, hi) in enumerate(itertools.pairwise(cuts)))
            EvalJobRun.objects.filter(pk=batch.pk).update(lanes=len(lanes))
            batch.lanes = len(lanes)
            if actor is not None:
                audit_change(actor, job.project, "evals.job_started", batch,
                             after={"job": job.name, "window_start": start.isoformat(), "window_end": end.isoformat(),
                                    "runs": total})
            lane_pks = [lane.pk for lane in lanes]
            transaction.on_commit(lambda: [_enqueue(pk, lease) for pk in lane_pks], robust=True)
    except IntegrityError:
        running = EvalJobRun.objects.filter(job=job, state=EvalJobRun.State.RUNNING).first()
        raise ApiError(ErrorCode.JOB_RUNNING, f"Eval job {job.name!r} is running already (batch "
                       f"{running.pk if running else '?'}); one batch of a job runs at a time.",
                       status_code=409) from None
    return batch


def _lane_cuts(window, first_pk: int, last_pk: int, total: int, size: int) -> list[int]:
    """The lanes' bounds: ``cuts[i] < pk <= cuts[i + 1]``, as many runs of the window in each (the
    window's ids interleave with other projects' and other agents'). ``EVALS_JOB_LANES`` lanes at most,
    and none shorter than a chunk: a small batch is one lane."""
    count = max(1, min(settings.EVALS_JOB_LANES, -(-total // size)))
    ordered = window.filter(pk__lte=last_pk).order_by("pk").values_list("pk", flat=True)
    cuts = [first_pk - 1]
    for i in range(1, count):
        at = ordered[total * i // count:total * i // count + 1].first()  # None: runs deleted meanwhile
        if at is not None and cuts[-1] < at - 1 < last_pk:
            cuts.append(at - 1)
    return [*cuts, last_pk]


def job_scheduled(*, job_pk: int) -> EvalJobRun | None:
    """Beat's cron fired: start a batch unless the job is gone, disabled, unscheduled or still running
    its last one (then this firing starts nothing; the next one will)."""
    job = EvalJob.objects.filter(pk=job_pk, enabled=True).exclude(schedule="").select_related("project").first()
    if job is None:
        return None
    try:
        return job_start(job=job, trigger=EvalJobRun.Trigger.SCHEDULE)
    except ApiError as exc:
        logger.info("eval job %s: scheduled batch not started: %s", job_pk, exc.detail)
        return None


@transaction.atomic
def job_cancel(*, batch: EvalJobRun, actor) -> EvalJobRun:
    """Stop a running batch: the chunks in flight commit nothing (their batch no longer runs)."""
    if EvalJobRun.objects.filter(pk=batch.pk, state=EvalJobRun.State.RUNNING).update(
            state=EvalJobRun.State.CANCELLED, finished_at=timezone.now()):
        EvalJobLane.objects.filter(batch=batch, done=False).update(lease_until=None)
        batch.refresh_from_db()
        audit_change(actor, batch.project, "evals.job_cancelled", batch, after={"scanned": batch.scanned})
        live.publish_progress(batch)
    else:
        batch.refresh_from_db()
    return batch


def _enqueue(lane_pk: int, lease: float) -> None:
    """A lane's next chunk as a task, its time limit just past its lease (a hung judge is stopped, then
    resumed)."""
    from .tasks import job_chunk

    job_chunk.apply_async((lane_pk,), time_limit=lease + 30, soft_time_limit=lease + 20)


# --- a chunk -------------------------------------------------------------------------------------------


def _fraction(job_pk: int, run_id: str) -> float:
    digest = hashlib.sha256(f"job:{job_pk}:{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _sample_below(job: EvalJob, window, flt: dict) -> float:
    """The sample of a batch, fixed when it starts: the ``sample_size`` runs of the window (and the
    agents asked for) whose hash by job and run id is lowest; so a batch run again over the same window
    picks the same runs (and adds no score). 1.0: every run."""
    size = flt["sample_size"]
    if not size:
        return 1.0
    pattern = flt["agent_pattern"]
    fractions = sorted(_fraction(job.pk, run_id) for run_id, agent in window.values_list("run_id", "agent_name")
                       if not pattern or fnmatch.fnmatchcase(agent, pattern))
    return fractions[size - 1] if len(fractions) > size else 1.0


def sampled(job_pk: int, run_id: str, below: float) -> bool:
    return below >= 1.0 or _fraction(job_pk, run_id) <= below


def _chunk_plan(specs: list[runner.Spec]) -> tuple[int, float]:
    """A chunk's size and its lease: a judge per run may take its timeout, so a chunk with a judge is
    small and its lease covers each judge's timeout for each run."""
    judges = [s for s in specs if not s.evaluator.deterministic]
    if not judges:
        return settings.EVALS_JOB_CHUNK, settings.EVALS_JOB_LEASE_SECONDS
    size = settings.EVALS_JOB_JUDGE_CHUNK
    per_run = sum(float(s.config.get("timeout_seconds", 30)) for s in judges)
    return size, settings.EVALS_JOB_LEASE_SECONDS + size * per_run


class _Stale(Exception):
    """The chunk is no longer its claim's (the batch was cancelled or failed, or the lane taken over
    after its lease expired)."""


def job_chunk_step(*, lane_pk: int, now=None) -> dict:
    """Claim, evaluate and commit a lane's next chunk; enqueue the one after. Nothing to claim (a
    duplicate, a finished lane, a batch no longer running, a live lease elsewhere): nothing done."""
    now = now or timezone.now()
    running = Q(done=False, batch__state=EvalJobRun.State.RUNNING)
    row = EvalJobLane.objects.filter(running, pk=lane_pk).values("generation", "attempts", "lease_until").first()
    if row is None or (row["lease_until"] is not None and row["lease_until"] > now):
        return {"claimed": False}
    lane = EvalJobLane.objects.select_related("batch").get(pk=lane_pk)
    batch = lane.batch
    specs = runner.specs_of(batch.evaluators)
    size, lease = _chunk_plan(specs)
    free = Q(lease_until__isnull=True) | Q(lease_until__lte=now)
    generation = row["generation"] + 1
    if not EvalJobLane.objects.filter(running, free, pk=lane_pk, generation=row["generation"]).update(
            generation=generation, lease_until=now + timedelta(seconds=lease), attempts=F("attempts") + 1):
        return {"claimed": False}
    if row["attempts"] + 1 > settings.EVALS_MAX_ATTEMPTS:
        with transaction.atomic():
            EvalJobRun.objects.filter(pk=batch.pk, state=EvalJobRun.State.RUNNING).update(
                state=EvalJobRun.State.FAILED, finished_at=timezone.now(),
                last_error=f"given up after {settings.EVALS_MAX_ATTEMPTS} attempts at the chunk after run id "
                           f"{lane.cursor} (a worker died or failed each time)")
            EvalJobLane.objects.filter(pk=lane_pk, generation=generation).update(lease_until=None)
            batch.refresh_from_db()
            live.publish_progress(batch)
        return {"claimed": True, "failed": True}

    flt = batch.filter
    runs = list(_window_runs(batch.project_id, flt, batch.window_start, batch.window_end)
                .filter(pk__gt=lane.cursor, pk__lte=lane.hi_pk).order_by("pk")[:size])
    pattern = flt["agent_pattern"]
    chosen = [r for r in runs if (not pattern or fnmatch.fnmatchcase(r.agent_name, pattern))
              and sampled(batch.job_id, r.run_id, batch.sample_below)]
    rows = runner.evaluate(chosen, specs, {"source": EvalScore.Source.JOB, "job_run_id": batch.pk})
    done = len(runs) < size or runs[-1].pk >= lane.hi_pk
    try:
        with transaction.atomic():
            added = runner.store(rows)
            # The lane first (its own row), then the batch (the row all lanes share: held from here to the
            # commit only), then whether any lane still walks: read after taking the batch's row, so of
            # two lanes finishing together the second sees the first's done.
            if not EvalJobLane.objects.filter(pk=lane_pk, generation=generation).update(
                    cursor=runs[-1].pk if runs else lane.cursor, done=done, chunks=F("chunks") + 1, attempts=0,
                    lease_until=None, enqueued_at=timezone.now()):
                raise _Stale
            if not EvalJobRun.objects.filter(pk=batch.pk, state=EvalJobRun.State.RUNNING).update(
                    scanned=F("scanned") + len(runs), evaluated=F("evaluated") + len(chosen),
                    scores_added=F("scores_added") + added,
                    errors=F("errors") + sum(1 for r in rows if r["outcome"] == EvalScore.Outcome.ERROR),
                    chunks=F("chunks") + 1, last_error=""):
                raise _Stale
            if done and not EvalJobLane.objects.filter(batch=batch, done=False).exists():
                EvalJobRun.objects.filter(pk=batch.pk).update(state=EvalJobRun.State.SUCCEEDED,
                                                              finished_at=timezone.now())
            batch.refresh_from_db()
            live.publish_progress(batch)
            if not done:
                transaction.on_commit(lambda: _enqueue(lane_pk, lease), robust=True)
    except _Stale:
        return {"claimed": True, "stale": True}
    return {"claimed": True, "scanned": len(runs), "evaluated": len(chosen), "scores_added": added, "done": done}


def job_sweep(*, now=None, limit: int = 100) -> int:
    """Beat: resume the lanes whose worker died (the lease expired) or whose next chunk's message was
    lost (no lease, enqueued longer ago than the grace). Returns how many."""
    now = now or timezone.now()
    grace = now - timedelta(seconds=settings.EVALS_ENQUEUE_GRACE_SECONDS)
    stuck = (Q(lease_until__lt=now) | Q(lease_until__isnull=True) & (Q(enqueued_at__isnull=True)
                                                                     | Q(enqueued_at__lt=grace)))
    rows = list(EvalJobLane.objects.filter(stuck, done=False, batch__state=EvalJobRun.State.RUNNING)
                .values_list("pk", "batch__evaluators")[:limit])
    if rows:
        EvalJobLane.objects.filter(pk__in=[pk for pk, _ in rows]).update(enqueued_at=now)
        for pk, evaluators in rows:
            _enqueue(pk, _chunk_plan(runner.specs_of(evaluators))[1])
    return len(rows)
