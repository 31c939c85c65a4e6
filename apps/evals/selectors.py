"""The evals' reads, scoped to what the caller may see (``traces.selectors.run_get`` for one run; a
run's rows are read only once the caller may see the run)."""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from django.db.models import Avg, Count, Min, OuterRef, Q, Subquery
from django.db.models.functions import TruncDate
from django.utils import timezone

from apps.projects.models import ROLE_PERMISSIONS
from apps.traces.models import Run

from . import evaluators
from .models import HUMAN, EvalConfig, EvalJob, EvalJobRun, EvalScore


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


def feedback_of(scores: list[dict], user) -> dict | None:
    """The person's own feedback among a run's scores (``run_scores``), if they gave one."""
    return next((s for s in scores if s["evaluator"] == HUMAN and s["user"] == user.username), None)


def score_summaries(run_pks: list[int]) -> dict[int, dict]:
    """For the runs list: per run (of a page the caller may see), how many run-level scores passed, failed
    or are evaluator errors, and a one-line title naming each; one query."""
    out = {}
    for pk, rows in runs_scores(run_pks).items():
        passed = sum(1 for r in rows if r["outcome"] == EvalScore.Outcome.SCORED and r["passed"] is True)
        failed = sum(1 for r in rows if r["outcome"] == EvalScore.Outcome.SCORED and r["passed"] is False)
        errors = sum(1 for r in rows if r["outcome"] == EvalScore.Outcome.ERROR)
        title = "; ".join(f"{r['evaluator']}: " + ("error" if r["outcome"] == EvalScore.Outcome.ERROR
                                                   else "pass" if r["passed"] else "fail" if r["passed"] is False
                                                   else f"{r['score']:g}" if r["score"] is not None else r["label"])
                          for r in rows)
        out[pk] = {"count": len(rows), "passed": passed, "failed": failed, "errors": errors, "title": title}
    return out


def agent_quality(*, principal, project_slug: str | None, since: datetime) -> dict[tuple[str, str, str], dict]:
    """Per (project slug, agent, version), over the runs started since ``since``: how many runs people gave
    feedback on (and thumbs up / down), and the pass rate of the evaluators' verdicts; one query."""
    human = Q(evaluator=HUMAN)
    rows = (EvalScore.objects.visible_to(principal, project_slug=project_slug)
            .filter(span_id="", outcome=EvalScore.Outcome.SCORED, run__started_at__gte=since)
            .values("project__slug", "run__agent_name", "run__agent_version")
            .annotate(feedback_runs=Count("run_id", filter=human, distinct=True),
                      up=Count("id", filter=human & Q(passed=True)), down=Count("id", filter=human & Q(passed=False)),
                      judged=Count("passed", filter=~human), passed=Count("id", filter=~human & Q(passed=True)))
            .order_by())
    return {(r["project__slug"], r["run__agent_name"], r["run__agent_version"]):
            {**{k: r[k] for k in ("feedback_runs", "up", "down", "judged", "passed")},
             "pass_rate": r["passed"] / r["judged"] if r["judged"] else None}
            for r in rows}


def may_score(user, access, project_id: int) -> bool:
    """Whether the person may give feedback on the project's runs (``score_project``: approvers, operators,
    admins; superusers), as the feedback API judges it, without a query: the roles come with ``access``."""
    if user.is_superuser:
        return True
    return any("score_project" in ROLE_PERMISSIONS.get(role, ()) for role in access.roles.get(project_id, ()))


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


def regressions_of(*, principal, project_slug: str | None = None, by: str = "window", **options) -> list[dict]:
    """``evals.regressions`` over the scores the caller may see (all their projects, or one)."""
    from . import regressions

    scores = EvalScore.objects.visible_to(principal, project_slug=project_slug)
    return (regressions.by_version if by == "version" else regressions.by_window)(scores, **options)


# --- the evals page ---------------------------------------------------------------------------------


def quality_by_agent(*, principal, project_slug: str | None, since: datetime) -> list[dict]:
    """Per (project, agent, evaluator), over the runs started since ``since``: the pass rate and mean
    score per day (by the run's start, UTC) and per agent version (oldest first); two queries. People's
    feedback is the evaluator ``human``."""
    base = (EvalScore.objects.visible_to(principal, project_slug=project_slug)
            .filter(span_id="", outcome=EvalScore.Outcome.SCORED, run__started_at__gte=since))
    figures = {"n": Count("id"), "judged": Count("passed"), "passed": Count("id", filter=Q(passed=True)),
               "mean": Avg("score")}
    groups: dict[tuple, dict] = {}

    def group(r) -> dict:
        key = (r["project__slug"], r["run__agent_name"], r["evaluator"])
        return groups.setdefault(key, {"project": key[0], "agent": key[1], "evaluator": key[2], "days": {},
                                       "versions": [], "n": 0, "judged": 0, "passed": 0})

    for r in (base.annotate(day=TruncDate("run__started_at")).values("project__slug", "run__agent_name", "evaluator",
                                                                     "day").annotate(**figures).order_by()):
        g = group(r)
        g["days"][r["day"]] = _rates(r)
        g["n"] += r["n"]
        g["judged"] += r["judged"]
        g["passed"] += r["passed"]
    for r in (base.values("project__slug", "run__agent_name", "evaluator", "run__agent_version")
              .annotate(**figures, first=Min("run__started_at")).order_by("first")):
        group(r)["versions"].append({"version": r["run__agent_version"], "first": r["first"], **_rates(r)})
    out = sorted(groups.values(), key=lambda g: (g["project"], g["agent"], g["evaluator"]))
    for g in out:
        g["pass_rate"] = g["passed"] / g["judged"] if g["judged"] else None
    return out


def _rates(r: dict) -> dict:
    return {"n": r["n"], "judged": r["judged"], "passed": r["passed"], "mean": r["mean"],
            "pass_rate": r["passed"] / r["judged"] if r["judged"] else None}


def jobs_with_latest_batch(*, principal, project_slug: str | None) -> list[dict]:
    """The eval jobs the caller may see, each with its latest batch (None: never run); two queries."""
    latest = EvalJobRun.objects.filter(job=OuterRef("pk")).order_by("-created_at", "-id").values("pk")[:1]
    jobs = list(EvalJob.objects.visible_to(principal, project_slug=project_slug).select_related("project")
                .annotate(latest_pk=Subquery(latest)).order_by("project__slug", "name"))
    batches = {b.pk: b for b in EvalJobRun.objects.filter(pk__in=[j.latest_pk for j in jobs if j.latest_pk])}
    return [{"job": j, "batch": batches.get(j.latest_pk)} for j in jobs]
