"""The product's pages (``/``): each route is a thin view over another app's selectors."""
from django.urls import path

from .views import agents, approvals, audit, auth, costs, evals, overview, queue, runs, sessions

app_name = "dashboard"

urlpatterns = [
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth.LogoutView.as_view(), name="logout"),
    path("", overview.OverviewPage.as_view(), name="overview"),
    path("runs/", runs.RunListPage.as_view(), name="runs"),
    path("runs/export.<str:fmt>", runs.RunListExport.as_view(), name="runs-export"),
    path("runs/<slug:project>/<str:run_id>/", runs.RunPage.as_view(), name="run"),
    path("runs/<slug:project>/<str:run_id>/export.json", runs.RunExport.as_view(), name="run-export"),
    path("runs/<slug:project>/<str:run_id>/spans/<str:span_id>/", runs.SpanPanel.as_view(), name="span"),
    path("runs/<slug:project>/<str:run_id>/spans/<str:span_id>/<str:field>.json", runs.SpanField.as_view(), name="span-field"),
    # sessions and agents pages
    path("agents/", agents.AgentsPage.as_view(), name="agents"),
    path("sessions/<slug:project>/<path:session_id>/", sessions.SessionPage.as_view(), name="session"),
    # costs page
    path("costs/", costs.CostsPage.as_view(), name="costs"),
    # approvals: the inbox and one approval
    path("approvals/", approvals.ApprovalInboxPage.as_view(), name="approvals"),
    path("approvals/<slug:project>/<str:approval_id>/", approvals.ApprovalPage.as_view(), name="approval"),
    # evals: regressions, quality by agent, batches
    path("evals/", evals.EvalsPage.as_view(), name="evals"),
    # the GPU queue, live
    path("queue/", queue.QueuePage.as_view(), name="queue"),
    # audit log page
    path("audit/", audit.AuditLogPage.as_view(), name="audit"),
    path("audit/export.<str:fmt>", audit.AuditExport.as_view(), name="audit-export"),
]
