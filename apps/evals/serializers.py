"""The evals API's inputs and outputs."""
from __future__ import annotations

from datetime import datetime

from django.core.validators import RegexValidator
from rest_framework import serializers

from .models import EvalConfig, EvalJob, EvalJobRun, EvalScore
from .regressions import REGRESSION_KINDS

_NO_NUL = RegexValidator(r"^[^\x00]*$", "must not contain NUL.")
_NAME = RegexValidator(r"^[A-Za-z0-9_.:\-/]+$", "letters, digits and _ . : - / only.")


class ScoreIn(serializers.Serializer):
    evaluator = serializers.CharField(max_length=100, validators=[_NAME],
                                      help_text="Your evaluator's name (not 'human': people's feedback).")
    version = serializers.CharField(max_length=50, default="1", validators=[_NAME])
    span_id = serializers.CharField(max_length=64, required=False, default="", allow_blank=True,
                                    validators=[_NO_NUL], help_text="The span scored; omitted: the whole run.")
    score = serializers.FloatField(required=False, allow_null=True, default=None, min_value=-1e12, max_value=1e12)
    label = serializers.CharField(max_length=100, required=False, default="", allow_blank=True, validators=[_NO_NUL])
    passed = serializers.BooleanField(required=False, allow_null=True, default=None)
    explanation = serializers.CharField(max_length=10000, required=False, default="", allow_blank=True,
                                        validators=[_NO_NUL])

    def validate_evaluator(self, value: str) -> str:
        if value.lower() == "human":
            raise serializers.ValidationError("'human' is people's feedback (POST …/feedback).")
        return value

    def validate(self, attrs):
        if attrs.get("score") is None and attrs.get("passed") is None and not attrs.get("label"):
            raise serializers.ValidationError({"score": "Give a score, a label or passed."})
        return attrs


class FeedbackIn(serializers.Serializer):
    passed = serializers.BooleanField(required=False, allow_null=True, default=None,
                                      help_text="Thumbs up (true) or down (false).")
    score = serializers.FloatField(required=False, allow_null=True, default=None, min_value=-1e6, max_value=1e6)
    comment = serializers.CharField(max_length=5000, required=False, default="", allow_blank=True,
                                    validators=[_NO_NUL])

    def validate(self, attrs):
        if attrs.get("score") is None and attrs.get("passed") is None:
            raise serializers.ValidationError({"passed": "Give thumbs up or down (passed), or a score."})
        return attrs


class ScoreOut(serializers.Serializer):
    id = serializers.IntegerField()
    evaluator = serializers.CharField()
    version = serializers.CharField()
    span_id = serializers.CharField(allow_null=True)
    score = serializers.FloatField(allow_null=True)
    label = serializers.CharField()
    passed = serializers.BooleanField(allow_null=True)
    explanation = serializers.CharField()
    outcome = serializers.ChoiceField(choices=EvalScore.Outcome.choices,
                                      help_text="error: the evaluator could not judge (error_code says why).")
    error_code = serializers.CharField(allow_null=True)
    details = serializers.JSONField(help_text="What else the evaluator kept: llm_judge's model and judge_run_id "
                                              "(the judge's own run, agent evals.llm_judge).")
    source = serializers.ChoiceField(choices=EvalScore.Source.choices)
    user = serializers.CharField(allow_null=True, help_text="The person, for people's feedback.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class ConfigSerializer(serializers.ModelSerializer):
    evaluators = serializers.JSONField(help_text='[{"name": "silent_success"}, {"name": "latency_slo", '
                                                 '"config": {"max_ms": 5000}}]')

    class Meta:
        model = EvalConfig
        fields = ["id", "name", "agent_pattern", "evaluators", "sample_rate", "enabled", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]


class EvaluatorOut(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.CharField()
    description = serializers.CharField()
    deterministic = serializers.BooleanField()
    config_schema = serializers.JSONField()


class JobSerializer(serializers.ModelSerializer):
    evaluators = serializers.JSONField(help_text='[{"name": "json_valid"}, {"name": "llm_judge", "config": {...}}]')
    statuses = serializers.JSONField(required=False, help_text='["completed", "failed"]; empty: every finished run.')
    next_run_at = serializers.SerializerMethodField(help_text="When beat starts its next batch (null: by hand only).")

    class Meta:
        model = EvalJob
        fields = ["id", "name", "evaluators", "agent_pattern", "agent_version", "statuses", "window_hours",
                  "sample_size", "schedule", "enabled", "next_run_at", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]

    def get_next_run_at(self, job: EvalJob) -> datetime | None:
        from .selectors import job_next_run_at

        return job_next_run_at(job)


class JobStartIn(serializers.Serializer):
    window_start = serializers.DateTimeField(required=False, allow_null=True, default=None,
                                             help_text="Runs started from then; default: window_end − the job's "
                                                       "window_hours.")
    window_end = serializers.DateTimeField(required=False, allow_null=True, default=None,
                                           help_text="Runs started before then; default: now.")


class JobRunOut(serializers.Serializer):
    id = serializers.IntegerField()
    job = serializers.IntegerField()
    state = serializers.ChoiceField(choices=EvalJobRun.State.choices)
    trigger = serializers.ChoiceField(choices=EvalJobRun.Trigger.choices)
    started_by = serializers.CharField(allow_null=True)
    evaluators = serializers.JSONField()
    filter = serializers.JSONField()
    window_start = serializers.DateTimeField()
    window_end = serializers.DateTimeField()
    total = serializers.IntegerField(help_text="The window's runs of the statuses asked for, when it started.")
    scanned = serializers.IntegerField()
    evaluated = serializers.IntegerField()
    scores_added = serializers.IntegerField(help_text="Scores this batch stored (runs scored before add none).")
    errors = serializers.IntegerField(help_text="Evaluator errors among them.")
    chunks = serializers.IntegerField()
    progress = serializers.FloatField(help_text="0..1")
    last_error = serializers.CharField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


class RegressionQuery(serializers.Serializer):
    by = serializers.ChoiceField(choices=REGRESSION_KINDS, default="window",
                                 help_text="window: the last window_hours against the baseline_days before them; "
                                           "version: each agent's newest version against the one before (last days)")
    window_hours = serializers.IntegerField(min_value=1, max_value=24 * 90, default=24)
    baseline_days = serializers.IntegerField(min_value=1, max_value=366, default=7)
    days = serializers.IntegerField(min_value=1, max_value=366, default=30)
    agent = serializers.CharField(max_length=200, required=False, validators=[_NO_NUL])
    evaluator = serializers.CharField(max_length=100, required=False, validators=[_NO_NUL])
    flagged = serializers.BooleanField(required=False, allow_null=True, default=None,
                                       help_text="true: only the comparisons flagged as regressions")


class RegressionSideOut(serializers.Serializer):
    label = serializers.CharField(help_text="baseline / current, or the agent version")
    runs = serializers.IntegerField()
    mean = serializers.FloatField(allow_null=True)
    pass_rate = serializers.FloatField(allow_null=True)
    judged = serializers.IntegerField(help_text="Runs with a pass/fail.")
    passed = serializers.IntegerField()


class RegressionOut(serializers.Serializer):
    kind = serializers.ChoiceField(choices=REGRESSION_KINDS)
    agent = serializers.CharField()
    evaluator = serializers.CharField()
    evaluator_version = serializers.CharField(allow_null=True, help_text="null for people's feedback (human).")
    baseline_from = serializers.DateTimeField(allow_null=True, help_text="window: where the baseline begins.")
    current_from = serializers.DateTimeField(allow_null=True, help_text="window: where the current window begins.")
    baseline_version = serializers.CharField(allow_null=True, help_text="version: the agent version before.")
    current_version = serializers.CharField(allow_null=True, help_text="version: the agent's newest version.")
    baseline = RegressionSideOut()
    current = RegressionSideOut()
    enough_runs = serializers.BooleanField(help_text="Both sides hold EVALS_REGRESSION_MIN_RUNS scored runs.")
    flagged = serializers.BooleanField()
    reasons = serializers.ListField(child=serializers.ChoiceField(choices=["pass_rate", "mean"]))
    pass_rate_drop = serializers.FloatField(allow_null=True)
    pass_rate_p = serializers.FloatField(allow_null=True, help_text="One-sided two-proportion z-test.")
    mean_drop = serializers.FloatField(allow_null=True)
    mean_p = serializers.FloatField(allow_null=True, help_text="One-sided Welch test (normal approximation).")
