from django.urls import path

from . import api

urlpatterns = [
    path("runs/<str:run_id>/scores", api.RunScoresView.as_view(), name="run-scores"),
    path("runs/<str:run_id>/feedback", api.RunFeedbackView.as_view(), name="run-feedback"),
    path("evaluators", api.EvaluatorListView.as_view(), name="evaluators"),
    path("projects/<slug:slug>/eval-configs", api.ConfigListView.as_view(), name="eval-configs"),
    path("projects/<slug:slug>/eval-configs/<int:config_id>", api.ConfigDetailView.as_view(),
         name="eval-config-detail"),
    path("projects/<slug:slug>/eval-regressions", api.RegressionsView.as_view(), name="eval-regressions"),
    path("projects/<slug:slug>/eval-jobs", api.JobListView.as_view(), name="eval-jobs"),
    path("projects/<slug:slug>/eval-jobs/<int:job_id>", api.JobDetailView.as_view(), name="eval-job-detail"),
    path("projects/<slug:slug>/eval-jobs/<int:job_id>/runs", api.JobRunsView.as_view(), name="eval-job-runs"),
    path("projects/<slug:slug>/eval-jobs/<int:job_id>/runs/<int:batch_id>", api.JobRunDetailView.as_view(),
         name="eval-job-run-detail"),
    path("projects/<slug:slug>/eval-jobs/<int:job_id>/runs/<int:batch_id>/cancel", api.JobRunCancelView.as_view(),
         name="eval-job-run-cancel"),
]
