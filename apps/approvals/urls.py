from django.urls import path

from . import api

urlpatterns = [
    path("projects/<slug:slug>/approval-rules", api.RuleListView.as_view(), name="approval-rules"),
    path("projects/<slug:slug>/approval-rules/<int:rule_id>", api.RuleDetailView.as_view(),
         name="approval-rule-detail"),
    path("approvals/check", api.CheckView.as_view(), name="approvals-check"),
    path("approvals", api.ApprovalListView.as_view(), name="approvals"),
    path("approvals/<str:approval_id>", api.ApprovalDetailView.as_view(), name="approval-detail"),
    path("approvals/<str:approval_id>/approve", api.ApproveView.as_view(), name="approval-approve"),
    path("approvals/<str:approval_id>/reject", api.RejectView.as_view(), name="approval-reject"),
    path("approvals/<str:approval_id>/consume", api.ConsumeView.as_view(), name="approval-consume"),
    path("approvals/<str:approval_id>/cancel", api.CancelView.as_view(), name="approval-cancel"),
]
