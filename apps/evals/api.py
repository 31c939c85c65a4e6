"""Evals over HTTP: a run's scores (read), scores from outside systems (API keys with the ``ingest``
scope), people's feedback (roles holding ``score_project``; never a key), the after-run
configurations (project admins; audited) and the evaluator registry."""
from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, query_params
from apps.common.errors import ErrorCode, ErrorSerializer
from apps.projects.edited_api import EditedRowsView, EditedRowView, documented_row, documented_rows
from apps.projects.permissions import PersonOnly, ProjectScopedAPIView, is_agent, project_param, require_scope
from apps.traces import selectors as traces

from . import jobs, selectors, services
from .models import EvalConfig, EvalJob, EvalJobRun
from .serializers import (
    ConfigSerializer,
    EvaluatorOut,
    FeedbackIn,
    JobRunOut,
    JobSerializer,
    JobStartIn,
    RegressionOut,
    RegressionQuery,
    ScoreIn,
    ScoreOut,
)


class RunScoresView(ProjectScopedAPIView):
    @extend_schema(summary="A run's scores (evaluators, external systems, the trace's own, people's feedback)",
                   responses={200: ScoreOut(many=True), **ERROR_RESPONSES})
    def get(self, request, run_id: str):
        require_scope(request, "read")
        run = traces.run_get(principal=self.access, run_id=run_id, project_slug=project_param(request))
        return Response(ScoreOut(selectors.run_scores(run), many=True).data)

    @extend_schema(summary="Add a score from an external evaluator (API keys with the ingest scope)",
                   description="Scores are never replaced: the same evaluator, version and span sent again with "
                               "the same values answers 200 with the score; with other values 409 score_exists "
                               "(send a new version).",
                   request=ScoreIn, responses={201: ScoreOut, 200: ScoreOut, **ERROR_RESPONSES,
                                               409: OpenApiResponse(ErrorSerializer, description="score_exists")})
    def post(self, request, run_id: str):
        if not is_agent(request):
            raise PermissionDenied("Scores are sent by an API key with the 'ingest' scope; people give feedback "
                                   "(POST …/feedback).", code=ErrorCode.API_KEY_REQUIRED)
        require_scope(request, "ingest")
        run = traces.run_get(principal=self.access, run_id=run_id)
        ser = ScoreIn(data=request.data)
        ser.is_valid(raise_exception=True)
        row, created = services.score_submit(key=request.auth, run=run, **ser.validated_data)
        return Response(ScoreOut(selectors.score_json(row)).data,
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class RunFeedbackView(ProjectScopedAPIView):
    @extend_schema(summary="Your feedback on a run: thumbs up or down, or a number, with a comment (people "
                           "whose role holds score_project; one per person and run, yours to change)",
                   request=FeedbackIn, responses={200: ScoreOut, **ERROR_RESPONSES})
    def post(self, request, run_id: str):
        PersonOnly().has_permission(request, self)
        run = traces.run_get(principal=self.access, run_id=run_id, project_slug=project_param(request))
        self.require_perm(run.project, "score_project")
        ser = FeedbackIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        row = services.feedback_submit(user=request.user, run=run, score=d["score"], passed=d["passed"],
                                       explanation=d["comment"])
        return Response(ScoreOut(selectors.score_json(row)).data)


class EvaluatorListView(ProjectScopedAPIView):
    @extend_schema(summary="The evaluators, with their versions and settings (JSON Schema)",
                   responses={200: EvaluatorOut(many=True), **ERROR_RESPONSES})
    def get(self, request):
        return Response(EvaluatorOut(selectors.registry(), many=True).data)


@documented_rows(ConfigSerializer, plural="after-run eval configurations", noun="an after-run eval configuration")
class ConfigListView(EditedRowsView):
    serializer_class = ConfigSerializer

    def rows(self, project):
        return selectors.configs_of_project(project)

    def create(self, *, project, actor, values):
        return services.config_create(project=project, actor=actor, **values)


@documented_row(ConfigSerializer, noun="an after-run eval configuration")
class ConfigDetailView(EditedRowView):
    serializer_class, model, lookup_url_kwarg = ConfigSerializer, EvalConfig, "config_id"

    def update(self, row, *, actor, values):
        return services.config_update(config=row, actor=actor, **values)

    def remove(self, row, *, actor):
        services.config_delete(config=row, actor=actor)


def _job(view: ProjectScopedAPIView, slug: str, job_id: int) -> EvalJob:
    return get_object_or_404(EvalJob.objects.select_related("project", "periodic_task__crontab"),
                             project=view.get_project(slug), pk=job_id)


@documented_rows(JobSerializer, plural="eval jobs (batches over history)", noun="an eval job",
                 added="; with a schedule (a cron line), beat starts its batches")
class JobListView(EditedRowsView):
    serializer_class = JobSerializer

    def rows(self, project):
        return selectors.jobs_of_project(project)

    def create(self, *, project, actor, values):
        return jobs.job_create(project=project, actor=actor, **values)


@documented_row(JobSerializer, noun="an eval job", changed="; a batch running keeps what it started with",
                removed="; its schedule goes with it, its scores stay")
class JobDetailView(EditedRowView):
    serializer_class, model, lookup_url_kwarg = JobSerializer, EvalJob, "job_id"

    def get_row(self, slug, row_id):
        return _job(self, slug, row_id)

    def update(self, row, *, actor, values):
        return jobs.job_update(job=row, actor=actor, **values)

    def remove(self, row, *, actor):
        jobs.job_delete(job=row, actor=actor)


class _JobView(ProjectScopedAPIView):
    def _job(self, slug: str, job_id: int) -> EvalJob:
        return _job(self, slug, job_id)


class JobRunsView(_JobView):
    @extend_schema(summary="An eval job's batches, newest first, with their progress",
                   responses={200: JobRunOut(many=True), **ERROR_RESPONSES})
    def get(self, request, slug: str, job_id: int):
        require_scope(request, "read")
        return Response(JobRunOut(selectors.job_runs(self._job(slug, job_id)), many=True).data)

    @extend_schema(summary="Start a batch now (project admins; audited)",
                   description="Its window defaults to the job's last window_hours. One batch of a job runs at a "
                               "time: 409 job_running while one does.",
                   request=JobStartIn, responses={201: JobRunOut, **ERROR_RESPONSES,
                                                  409: OpenApiResponse(ErrorSerializer, description="job_running")})
    def post(self, request, slug: str, job_id: int):
        PersonOnly().has_permission(request, self)
        job = self._job(slug, job_id)
        self.require_perm(job.project, "change_project")
        ser = JobStartIn(data=request.data)
        ser.is_valid(raise_exception=True)
        batch = jobs.job_start(job=job, trigger=EvalJobRun.Trigger.MANUAL, actor=request.user,
                               window_start=ser.validated_data["window_start"],
                               window_end=ser.validated_data["window_end"])
        return Response(JobRunOut(selectors.job_run_json(batch)).data, status=status.HTTP_201_CREATED)


class _BatchView(_JobView):
    def _batch(self, slug: str, job_id: int, batch_id: int) -> EvalJobRun:
        return get_object_or_404(EvalJobRun.objects.select_related("project", "started_by"),
                                 job=self._job(slug, job_id), pk=batch_id)


class JobRunDetailView(_BatchView):
    @extend_schema(summary="A batch and its progress", responses={200: JobRunOut, **ERROR_RESPONSES})
    def get(self, request, slug: str, job_id: int, batch_id: int):
        require_scope(request, "read")
        return Response(JobRunOut(selectors.job_run_json(self._batch(slug, job_id, batch_id))).data)


class JobRunCancelView(_BatchView):
    @extend_schema(summary="Cancel a running batch (project admins; audited): the chunk in flight stores nothing",
                   request=None, responses={200: JobRunOut, **ERROR_RESPONSES})
    def post(self, request, slug: str, job_id: int, batch_id: int):
        PersonOnly().has_permission(request, self)
        batch = self._batch(slug, job_id, batch_id)
        self.require_perm(batch.project, "change_project")
        return Response(JobRunOut(selectors.job_run_json(jobs.job_cancel(batch=batch, actor=request.user))).data)


class RegressionsView(ProjectScopedAPIView):
    @extend_schema(summary="Regressions: per agent and evaluator, a window or the newest agent version against a "
                           "baseline (mean score, pass rate, counts, significance), flagged first",
                   parameters=[RegressionQuery], responses={200: RegressionOut(many=True), **ERROR_RESPONSES})
    def get(self, request, slug: str):
        require_scope(request, "read")
        project = self.get_project(slug)
        q = query_params(RegressionQuery, request)
        options = {"agent": q.get("agent"), "evaluator": q.get("evaluator")} | (
            {"days": q["days"]} if q["by"] == "version"
            else {"window_hours": q["window_hours"], "baseline_days": q["baseline_days"]})
        items = selectors.regressions_of(principal=self.access, project_slug=project.slug, by=q["by"], **options)
        if q["flagged"] is not None:
            items = [i for i in items if i["flagged"] == q["flagged"]]
        return Response(RegressionOut(items, many=True).data)
