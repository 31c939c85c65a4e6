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
