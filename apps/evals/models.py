"""Scores on runs, what produces them after each run, and the outbox that makes "after each run"
exactly once.

A score is keyed by (run, span, evaluator, version): evaluating again adds nothing and replaces
nothing (an evaluator error is the one row a later success may take over, visibly: ``outcome``
changes). A person's feedback is the ``human`` evaluator with the person's own version
(``user:<id>``), so each person holds one feedback per run and may change it.
"""
from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from apps.projects.models import ProjectOwnedQuerySet

HUMAN = "human"  # the evaluator name of people's feedback


class EvalConfig(models.Model):
    """Which evaluators run after each run of a project (or of its agents matching a glob), on what
    share of the runs. Edited by the project's admins (audited)."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="eval_configs")
    name = models.CharField(max_length=100)
    agent_pattern = models.CharField(max_length=200, blank=True,
                                     help_text="The agents whose runs it evaluates (a glob); empty: every run.")
    evaluators = models.JSONField(
        default=list, help_text='The evaluators and their settings: [{"name": "silent_success"}, '
                                '{"name": "latency_slo", "config": {"max_ms": 5000}}].')
    sample_rate = models.FloatField(default=1.0, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
                                    help_text="The share of finished runs evaluated (0..1), chosen by the run's id "
                                              "so that a run is in or out for good.")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    FIELDS = ("name", "agent_pattern", "evaluators", "sample_rate", "enabled")

    class Meta:
        verbose_name = "eval configuration"
        ordering = ["project", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="evals_config_name")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from .evaluators import specs_errors

        problems = specs_errors(self.evaluators)
        if problems:
            raise ValidationError({"evaluators": problems})

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


class EvalScore(models.Model):
    class Source(models.TextChoices):
        AFTER_RUN = "after_run", "After the run (configuration)"
        JOB = "job", "Batch job"
        API = "api", "External (API)"
        TRACE = "trace", "In the trace (gen_ai.evaluation.result)"
        HUMAN = "human", "A person"

    class Outcome(models.TextChoices):
        SCORED = "scored"
        ERROR = "error", "Evaluator error"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    run = models.ForeignKey("traces.Run", on_delete=models.CASCADE, related_name="+")
    span_id = models.CharField(max_length=64, blank=True, help_text="The span scored; empty: the whole run.")
    evaluator = models.CharField(max_length=100)
    version = models.CharField(max_length=50)
    score = models.FloatField(null=True, blank=True)
    label = models.CharField(max_length=100, blank=True)
    passed = models.BooleanField(null=True, blank=True)
    explanation = models.TextField(blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.SCORED)
    error_code = models.CharField(max_length=64, blank=True)
    details = models.JSONField(default=dict, blank=True,
                               help_text="What else the evaluator kept: a judge's model and its own run's id.")
    source = models.CharField(max_length=16, choices=Source.choices)
    config = models.ForeignKey(EvalConfig, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    job_run = models.ForeignKey("EvalJobRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                help_text="The batch that scored it.")
    api_key = models.ForeignKey("projects.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["run", "evaluator", "span_id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "span_id", "evaluator", "version"], name="evals_score_identity"),
            models.CheckConstraint(condition=Q(outcome="scored") | Q(score__isnull=True, passed__isnull=True),
                                   name="evals_score_error_has_no_score"),
        ]
        indexes = [
            models.Index(fields=["project", "evaluator", "-created_at"], name="evals_score_evaluator"),
        ]

    def __str__(self) -> str:
        return f"{self.evaluator}@{self.version} on run {self.run_id}"


class EvalPending(models.Model):
    """The outbox of "after each run": written in the transaction that finished the run (so it cannot be
    lost between that commit and a task being enqueued), claimed by a worker with a lease and a
    generation, done once its scores are stored. The beat re-enqueues what waits too long or whose
    worker died (its lease expired)."""

    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    run = models.ForeignKey("traces.Run", on_delete=models.CASCADE, related_name="+")
    config = models.ForeignKey(EvalConfig, on_delete=models.CASCADE, related_name="+")
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    due_at = models.DateTimeField(help_text="Not before (late spans of an OTLP trace have a moment to arrive).")
    enqueued_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    generation = models.PositiveIntegerField(default=0)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    done_at = models.DateTimeField(null=True, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        verbose_name = "pending evaluation"
        constraints = [models.UniqueConstraint(fields=["run", "config"], name="evals_pending_once")]
        indexes = [
            models.Index(fields=["due_at"], condition=Q(state__in=["pending", "running"]), name="evals_pending_open"),
        ]

    def __str__(self) -> str:
        return f"evals of run {self.run_id} ({self.state})"


FINISHED_STATUSES = ["completed", "failed", "cancelled"]


class EvalJob(models.Model):
    """A batch over history: evaluators run on the runs a filter picks (agent, version, status, a time
    window, a sample), started by hand or by a cron schedule that beat keeps (a django-celery-beat
    ``PeriodicTask`` this row owns, kept in step by the services). Edited by project admins (audited)."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="eval_jobs")
    name = models.CharField(max_length=100)
    evaluators = models.JSONField(default=list, help_text='As in an eval configuration: [{"name": "json_valid"}].')
    agent_pattern = models.CharField(max_length=200, blank=True, help_text="The agents (a glob); empty: every agent.")
    agent_version = models.CharField(max_length=100, blank=True, help_text="Only this agent version; empty: any.")
    statuses = models.JSONField(default=list, blank=True,
                                help_text='The runs\' statuses: ["completed", "failed"]; empty: every finished run '
                                          '(completed, failed, cancelled).')
    window_hours = models.PositiveIntegerField(
        default=24, validators=[MinValueValidator(1), MaxValueValidator(24 * 366)],
        help_text="The runs started in the last this many hours when a batch starts (a batch started by hand "
                  "may name its own window).")
    sample_size = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)],
                                              help_text="At most this many runs, chosen by run id; empty: all.")
    schedule = models.CharField(max_length=100, blank=True,
                                help_text='A cron line (minute hour day-of-month month day-of-week, in the site\'s '
                                          'time zone), e.g. "0 3 * * *"; empty: only when started by hand.')
    enabled = models.BooleanField(default=True)
    periodic_task = models.OneToOneField("django_celery_beat.PeriodicTask", null=True, blank=True, editable=False,
                                         on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    FIELDS = ("name", "evaluators", "agent_pattern", "agent_version", "statuses", "window_hours", "sample_size",
              "schedule", "enabled")

    class Meta:
        verbose_name = "eval job"
        ordering = ["project", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="evals_job_name")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from .evaluators import specs_errors

        errors = {}
        problems = specs_errors(self.evaluators)
        if problems:
            errors["evaluators"] = problems
        if not isinstance(self.statuses, list) or any(s not in FINISHED_STATUSES for s in self.statuses):
            errors["statuses"] = f"A list of: {', '.join(FINISHED_STATUSES)}."
        if self.schedule:
            problem = cron_problem(self.schedule)
            if problem:
                errors["schedule"] = problem
        if errors:
            raise ValidationError(errors)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def filter_snapshot(self) -> dict:
        return {"agent_pattern": self.agent_pattern, "agent_version": self.agent_version,
                "statuses": self.statuses or FINISHED_STATUSES, "sample_size": self.sample_size}


def cron_fields(line: str) -> list[str]:
    return line.split()


def cron_problem(line: str) -> str:
    """What is wrong with a cron line; "" if nothing."""
    from celery.schedules import crontab

    fields = cron_fields(line)
    if len(fields) != 5:
        return "Five fields: minute hour day-of-month month day-of-week (e.g. \"0 3 * * *\")."
    try:
        crontab(minute=fields[0], hour=fields[1], day_of_month=fields[2], month_of_year=fields[3],
                day_of_week=fields[4])
    except (ValueError, TypeError) as exc:
        return f"Not a cron line: {exc}"
    return ""


class EvalJobRun(models.Model):
    """One batch of an eval job: its window, filter and evaluators fixed when it started (a job edited
    meanwhile changes the next batch, not this one). Its run ids are split into lanes (``EvalJobLane``)
    walked side by side, each in run-id order from its own cursor; each chunk's scores, its lane's
    cursor and the batch's counts commit together. A batch run again over the same runs adds no score
    (unique per run, evaluator and version)."""

    class State(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule"
        MANUAL = "manual", "By hand"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey(EvalJob, on_delete=models.CASCADE, related_name="runs")
    trigger = models.CharField(max_length=8, choices=Trigger.choices)
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    evaluators = models.JSONField(default=list)
    filter = models.JSONField(default=dict)
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    sample_below = models.FloatField(default=1.0, help_text="A run is in the sample when its hash (by job and run "
                                                             "id, 0..1) is at most this: the sample_size lowest.")
    first_pk = models.BigIntegerField(default=0, help_text="The window's runs lie in first_pk..last_pk (fixed at the "
                                                           "start: runs that arrive later are the next batch's).")
    last_pk = models.BigIntegerField(default=0)
    lanes = models.PositiveSmallIntegerField(default=1, help_text="How many lanes walk its runs side by side.")
    total = models.PositiveIntegerField(default=0, help_text="The window's runs of the statuses asked for.")
    scanned = models.PositiveIntegerField(default=0)
    evaluated = models.PositiveIntegerField(default=0, help_text="Runs evaluated (in the sample, the agents asked for).")
    scores_added = models.PositiveIntegerField(default=0, help_text="Scores stored by this batch (a run scored "
                                                                    "before adds none).")
    errors = models.PositiveIntegerField(default=0, help_text="Evaluator errors among them.")
    chunks = models.PositiveIntegerField(default=0)
    state = models.CharField(max_length=10, choices=State.choices, default=State.RUNNING)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    class Meta:
        verbose_name = "eval job run"
        ordering = ["-created_at", "-id"]
        constraints = [
            # One batch of a job at a time: a schedule firing while the last one still runs starts none.
            models.UniqueConstraint(fields=["job"], condition=Q(state="running"), name="evals_jobrun_one_running"),
        ]

    def __str__(self) -> str:
        return f"{self.job} #{self.pk} ({self.state})"

    @property
    def progress(self) -> float:
        if self.state == self.State.SUCCEEDED:
            return 1.0
        return min(self.scanned / self.total, 1.0) if self.total else 0.0


class EvalJobLane(models.Model):
    """One lane of a batch: the run ids ``(lo_pk, hi_pk]``, walked in order from ``cursor`` one chunk at a
    time by whichever worker claims it. A claim is a conditional update (not done, no live lease, the
    generation read, its batch running) that bumps the generation and sets a lease; the chunk's commit
    counts only while the generation is still its own. So a redelivered or duplicated message finds
    nothing to claim, a worker killed mid-chunk loses that chunk only (the sweep resumes the lane from its
    cursor once the lease expired), and the lanes of a batch never walk the same run."""

    batch = models.ForeignKey(EvalJobRun, on_delete=models.CASCADE, related_name="lane_set")
    index = models.PositiveSmallIntegerField()
    lo_pk = models.BigIntegerField(help_text="The lane's runs have ids above this…")
    hi_pk = models.BigIntegerField(help_text="…and up to this.")
    cursor = models.BigIntegerField(help_text="The last run id walked past.")
    done = models.BooleanField(default=False)
    chunks = models.PositiveIntegerField(default=0)
    generation = models.PositiveIntegerField(default=0)
    lease_until = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Claims of the current chunk.")

    class Meta:
        verbose_name = "eval job lane"
        ordering = ["batch", "index"]
        constraints = [models.UniqueConstraint(fields=["batch", "index"], name="evals_joblane_unique")]
        indexes = [models.Index(fields=["lease_until"], condition=Q(done=False), name="evals_joblane_open")]

    def __str__(self) -> str:
        return f"lane {self.index} of batch {self.batch_id}"
