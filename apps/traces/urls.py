from django.urls import path

from . import api

urlpatterns = [
    path("runs", api.RunListView.as_view(), name="run-list"),
    path("runs/<str:run_id>", api.RunDetailView.as_view(), name="run-detail"),
    path("runs/<str:run_id>/spans", api.RunSpansView.as_view(), name="run-spans"),
    path("runs/<str:run_id>/spans/<str:span_id>", api.SpanUpdateView.as_view(), name="span-update"),
    path("runs/<str:run_id>/finish", api.RunFinishView.as_view(), name="run-finish"),
    path("sessions/<str:session_id>", api.SessionDetailView.as_view(), name="session-detail"),
    path("sessions/<str:session_id>/runs", api.SessionRunsView.as_view(), name="session-runs"),
    path("sessions/<str:session_id>/tool-calls", api.SessionToolCallsView.as_view(), name="session-tool-calls"),
    path("agents", api.AgentListView.as_view(), name="agent-list"),
]
