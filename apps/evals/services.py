"""The evals' writes: configurations (project admins; audited), scores from outside (the API, the
traces' own evaluation events, people's feedback), and "after each run" (the outbox written with the
finish, claimed by a worker, done once).

Exactly once, after each run: the finish and its ``EvalPending`` rows commit together
(``receivers.on_runs_finishing``); a worker claims a run's rows with a conditional update that bumps
their generation and sets a lease; the scores and the ``done`` mark commit together, and only while
the generation is still the worker's. A redelivered or duplicated task finds nothing to claim; a
worker killed mid-way leaves its lease to expire and the beat's sweep enqueues the run again; the
scores' unique key makes any overlap add nothing.
"""
from __future__ import annotations

import fnmatch
import hashlib
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Min, Q
from django.utils import timezone

from apps.common.bulk import insert_rows_ignoring_conflicts
from apps.common.errors import ApiError, ErrorCode
from apps.projects.models import ApiKey, Project
from apps.projects.services import audit_change, update_audited
from apps.traces.models import Run

from . import runner
from .evaluators import finite_number
from .judge import JUDGE_AGENT
from .models import HUMAN, EvalConfig, EvalPending, EvalScore

# --- configurations (project admins; audited) -----------------------------------------------------


@transaction.atomic
def config_create(*, project: Project, actor, **fields) -> EvalConfig:
    unknown = set(fields) - set(EvalConfig.FIELDS)
    if unknown:
        raise ValidationError({sorted(unknown)[0]: "is not a field of an eval configuration."})
    config = EvalConfig(project=project, **fields)
    config.full_clean(exclude=["project"])
    if EvalConfig.objects.filter(project=project, name=config.name).exists():
        raise ValidationError({"name": "An eval configuration of this project has this name already."})
    config.save()
    audit_change(actor, project, "evals.config_created", config, after=config.as_dict())
    return config


@transaction.atomic
def config_update(*, config: EvalConfig, actor, **changes) -> EvalConfig:
    config = EvalConfig.objects.select_for_update().select_related("project").get(pk=config.pk)
    return update_audited(config, changes, EvalConfig.FIELDS, lambda: config.full_clean(exclude=["project"]),
                          actor, "evals.config_updated")


@transaction.atomic
def config_delete(*, config: EvalConfig, actor) -> None:
    audit_change(actor, config.project, "evals.config_deleted", config, before=config.as_dict())
    config.delete()


# --- after each run ------------------------------------------------------------------------------


def sampled(config: EvalConfig, run_id: str) -> bool:
    """Whether a run is in a configuration's sample: decided by its id, so that a re-sent finish or a
    re-run decides the same."""
    if config.sample_rate >= 1:
        return True
    digest = hashlib.sha256(f"{config.pk}:{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < config.sample_rate


def configs_for(config_rows: list[EvalConfig], run: Run) -> list[EvalConfig]:
    return [c for c in config_rows if (not c.agent_pattern or fnmatch.fnmatchcase(run.agent_name, c.agent_pattern))
            and sampled(c, run.run_id)]


# The statuses evaluated after a run. LOST is not: a late span may bring the run back, and a batch job
# can score lost runs deliberately.
AFTER_RUN_STATUSES = (Run.Status.COMPLETED, Run.Status.FAILED, Run.Status.CANCELLED)


def after_run_schedule(*, project_id: int, runs: list[Run]) -> None:
    """In the transaction that finished ``runs``: an outbox row per (run, configuration that applies),
    and after commit a task per run (the beat enqueues again whatever this leaves waiting)."""
    # A judge's own run is not judged in turn (that would call judges forever).
    runs = [r for r in runs if r.status in AFTER_RUN_STATUSES and r.agent_name != JUDGE_AGENT]
    if not runs:
        return
    config_rows = list(EvalConfig.objects.filter(project_id=project_id, enabled=True))
    if not config_rows:
        return
    now = timezone.now()
    due = now + timedelta(seconds=settings.EVALS_AFTER_RUN_DELAY_SECONDS)
    wanted = [(run, c) for run in runs for c in configs_for(config_rows, run)]
    if not wanted:
        return
    held = set(EvalPending.objects.filter(run_id__in={r.pk for r, _ in wanted}).values_list("run_id", "config_id"))
    new = [(run, c) for run, c in wanted if (run.pk, c.pk) not in held]
    if not new:
        return  # a re-sent finish: its evaluation is (or was) scheduled already
    insert_rows_ignoring_conflicts(EvalPending, [
        {"project_id": project_id, "run_id": run.pk, "config_id": c.pk, "due_at": due, "enqueued_at": now}
        for run, c in new])
    run_pks = sorted({run.pk for run, _ in new})
    transaction.on_commit(lambda: _enqueue(run_pks, countdown=settings.EVALS_AFTER_RUN_DELAY_SECONDS), robust=True)


def _enqueue(run_pks: list[int], *, countdown: float = 0) -> None:
    from .tasks import after_run

    for pk in run_pks:
        after_run.apply_async((pk,), countdown=countdown or None)


def after_run_step(*, run_pk: int, now=None) -> dict:
    """Evaluate what waits for one run: claim its due rows, evaluate, store and mark done (only rows
    still claimed by this call). Returns counts; ``not_before`` when rows wait that are not yet due."""
    now = now or timezone.now()
    open_rows = Q(state=EvalPending.State.PENDING) | Q(state=EvalPending.State.RUNNING, lease_until__lt=now)
    candidates = list(EvalPending.objects.filter(open_rows, run_id=run_pk, due_at__lte=now)
                      .values_list("pk", "generation"))
    lease_until = now + timedelta(seconds=settings.EVALS_LEASE_SECONDS)
    claimed = []
    for pk, generation in candidates:  # a conditional update each: two workers never both claim one
        if EvalPending.objects.filter(open_rows, pk=pk, generation=generation).update(
                state=EvalPending.State.RUNNING, generation=generation + 1, lease_until=lease_until,
                attempts=F("attempts") + 1):
            claimed.append(pk)
    if not claimed:
        later = EvalPending.objects.filter(run_id=run_pk, state=EvalPending.State.PENDING,
                                           due_at__gt=now).aggregate(at=Min("due_at"))["at"]
        return {"claimed": 0, "scores": 0, "not_before": later}
    rows = list(EvalPending.objects.select_related("config").filter(pk__in=claimed))
    run = Run.objects.get(pk=run_pk)
    scores: list[dict] = []
    failed, evaluated = [], []
    for p in rows:
        if p.attempts > settings.EVALS_MAX_ATTEMPTS:
            failed.append(p)
            continue
        evaluated.append(p)
        if p.config.enabled:
            scores += runner.evaluate([run], runner.specs_of(p.config.evaluators),
                                      {"source": EvalScore.Source.AFTER_RUN, "config_id": p.config_id})
    with transaction.atomic():
        mine = [p.pk for p in evaluated
                if EvalPending.objects.filter(pk=p.pk, generation=p.generation, state=EvalPending.State.RUNNING)
                .update(state=EvalPending.State.DONE, done_at=timezone.now(), lease_until=None)]
        runner.store([s for s in scores if s["config_id"] in {p.config_id for p in evaluated if p.pk in mine}])
        for p in failed:
            EvalPending.objects.filter(pk=p.pk, generation=p.generation).update(
                state=EvalPending.State.FAILED, lease_until=None,
                last_error=f"given up after {settings.EVALS_MAX_ATTEMPTS} attempts (a worker died each time)")
    return {"claimed": len(claimed), "scores": len(scores), "not_before": None}


def pending_sweep(*, now=None, limit: int = 1000) -> int:
    """Beat: enqueue again the runs whose evaluation waits longer than it should (an enqueue lost with
    its process, a broker outage) or whose worker died (the lease expired). Returns how many runs."""
    now = now or timezone.now()
    grace = now - timedelta(seconds=settings.EVALS_ENQUEUE_GRACE_SECONDS)
    stuck = (Q(state=EvalPending.State.PENDING, due_at__lte=now) & (Q(enqueued_at__isnull=True)
                                                                   | Q(enqueued_at__lt=grace))
             | Q(state=EvalPending.State.RUNNING, lease_until__lt=now))
    rows = list(EvalPending.objects.filter(stuck).values_list("pk", "run_id")[:limit])
    if not rows:
        return 0
    EvalPending.objects.filter(pk__in=[pk for pk, _ in rows]).update(enqueued_at=now)
    run_pks = sorted({run_pk for _, run_pk in rows})
    _enqueue(run_pks)
    return len(run_pks)


# --- scores from outside ---------------------------------------------------------------------------

SCORE_FIELDS = ("score", "label", "passed", "explanation")


def _existing_or_conflict(held: EvalScore, values: dict) -> EvalScore:
    same = all(getattr(held, f) == values.get(f, EvalScore._meta.get_field(f).get_default()) for f in SCORE_FIELDS)
    if not same:
        raise ApiError(ErrorCode.SCORE_EXISTS,
                       f"Run {held.run.run_id} already holds a score of {held.evaluator}@{held.version}"
                       f"{' on span ' + held.span_id if held.span_id else ''}; scores are never replaced: "
                       "send a new version.", status_code=409)
    return held


def score_submit(*, key: ApiKey, run: Run, evaluator: str, version: str, span_id: str = "",
                 **values) -> tuple[EvalScore, bool]:
    """An external system's score (a key with the ingest scope). Sent again with the same values: the
    same row (False: not created); with other values: 409 ``score_exists``."""
    fields = {f: values[f] for f in SCORE_FIELDS if f in values}
    with transaction.atomic():
        held = EvalScore.objects.filter(run=run, span_id=span_id, evaluator=evaluator, version=version).first()
        if held is not None:
            return _existing_or_conflict(held, fields), False
        insert_rows_ignoring_conflicts(EvalScore, [{
            "project_id": run.project_id, "run_id": run.pk, "span_id": span_id, "evaluator": evaluator,
            "version": version, "source": EvalScore.Source.API, "api_key_id": key.pk, **fields}])
    row = EvalScore.objects.get(run=run, span_id=span_id, evaluator=evaluator, version=version)
    if row.api_key_id != key.pk or row.source != EvalScore.Source.API:
        return _existing_or_conflict(row, fields), False  # a concurrent writer won the key
    return row, True


def feedback_version(user) -> str:
    return f"user:{user.pk}"


@transaction.atomic
def feedback_submit(*, user, run: Run, score: float | None = None, passed: bool | None = None,
                    explanation: str = "") -> EvalScore:
    """A person's feedback on a run (thumbs up / down as ``passed``, or a number, with a comment): one
    per person and run, theirs to change; attributed to them."""
    label = "" if passed is None else ("up" if passed else "down")
    values = {"score": score if score is not None else (None if passed is None else float(passed)),
              "passed": passed, "label": label, "explanation": explanation}
    row, _ = EvalScore.objects.update_or_create(
        run=run, span_id="", evaluator=HUMAN, version=feedback_version(user),
        defaults={**values, "project_id": run.project_id, "source": EvalScore.Source.HUMAN, "user": user,
                  "outcome": EvalScore.Outcome.SCORED})
    return row


def label_passed(label: str | None) -> bool | None:
    """pass / fail read from an evaluation's label, where it says so."""
    value = (label or "").strip().lower()
    if value in {"pass", "passed", "true", "yes", "correct", "good", "ok", "success"}:
        return True
    if value in {"fail", "failed", "false", "no", "incorrect", "bad", "failure", "wrong"}:
        return False
    return None


def _evaluations(span: dict) -> list:
    details = span.get("details")
    evals = details.get("evaluations") if isinstance(details, dict) else None
    return evals if isinstance(evals, list) else []


def trace_scores_store(changes) -> None:
    """In the projection's transaction: the ``gen_ai.evaluation.result`` events of changed spans as
    scores (evaluator: the evaluation's name; version ``trace``), each once."""
    rows = []
    for change in changes:
        evals = _evaluations(change.after)
        if not evals or (change.before is not None and _evaluations(change.before) == evals):
            continue
        for item in evals:
            score = finite_number(item.get("score")) if isinstance(item, dict) else None
            if not isinstance(item, dict) or (score is None and not item.get("label")):
                continue
            rows.append({"project_id": change.run.project_id, "run_id": change.run.pk, "span_id": change.span_id,
                         "evaluator": str(item.get("name") or "evaluation")[:100], "version": "trace",
                         "score": score, "label": str(item.get("label") or "")[:100],
                         "passed": label_passed(item.get("label")),
                         "explanation": str(item.get("explanation") or "")[:10000],
                         "source": EvalScore.Source.TRACE})
    insert_rows_ignoring_conflicts(EvalScore, rows)
