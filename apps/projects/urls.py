from django.urls import path

from . import api

urlpatterns = [
    path("me", api.MeView.as_view(), name="me"),
    path("projects", api.ProjectListView.as_view(), name="project-list"),
    path("projects/<slug:slug>", api.ProjectDetailView.as_view(), name="project-detail"),
    path("projects/<slug:slug>/members", api.MemberListView.as_view(), name="member-list"),
    path("projects/<slug:slug>/members/<str:username>/<str:role>", api.MemberRoleView.as_view(),
         name="member-role"),
    path("projects/<slug:slug>/webhook-secret", api.WebhookSecretRotateView.as_view(), name="webhook-secret"),
    path("projects/<slug:slug>/keys", api.ApiKeyListView.as_view(), name="apikey-list"),
    path("projects/<slug:slug>/keys/<int:key_id>/revoke", api.ApiKeyRevokeView.as_view(), name="apikey-revoke"),
]
