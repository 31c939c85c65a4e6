"""HTTP adapters for projects, members, API keys and /me. Thin: parse, authorise, call a service."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES

from . import services
from .models import ApiKey, Project
from .permissions import HasScope, PersonOnly, ProjectScopedAPIView, is_agent
from .selectors import project_members, roles_by_project
from .serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    MemberSerializer,
    MeSerializer,
    ProjectCreateSerializer,
    ProjectSerializer,
    ProjectUpdateSerializer,
    RoleGrantSerializer,
)


class MeView(ProjectScopedAPIView):
    @extend_schema(responses={200: MeSerializer, **ERROR_RESPONSES}, summary="Who am I")
    def get(self, request):
        if is_agent(request):
            key: ApiKey = request.user
            data = {"type": "api_key", "project": key.project.slug, "scopes": key.scopes,
                    "key_prefix": key.display_prefix}
        else:
            user = request.user
            roles = roles_by_project(self.access)
            projects = self.visible(Project.objects.all())
            data = {
                "type": "user",
                "username": user.get_username(),
                "is_superuser": user.is_superuser,
                "projects": [{"slug": p.slug, "name": p.name, "roles": roles.get(p.pk, [])} for p in projects],
            }
        return Response(MeSerializer(data).data)


class ProjectListView(ProjectScopedAPIView):
    permission_classes = [IsAuthenticated, HasScope("read")]
    @extend_schema(responses={200: ProjectSerializer(many=True), **ERROR_RESPONSES})
    def get(self, request):
        return Response(ProjectSerializer(self.visible(Project.objects.all()), many=True).data)

    @extend_schema(request=ProjectCreateSerializer, responses={201: ProjectSerializer, **ERROR_RESPONSES})
    def post(self, request):
        PersonOnly().has_permission(request, self)
        if not request.user.has_perm("projects.add_project"):
            raise PermissionDenied("You may not create projects.")
        ser = ProjectCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        project = services.project_create(actor=request.user, **ser.validated_data)
        return Response(ProjectSerializer(project).data, status=status.HTTP_201_CREATED)


class ProjectDetailView(ProjectScopedAPIView):
    permission_classes = [IsAuthenticated, HasScope("read")]
    @extend_schema(responses={200: ProjectSerializer, **ERROR_RESPONSES})
    def get(self, request, slug: str):
        return Response(ProjectSerializer(self.get_project(slug)).data)

    @extend_schema(request=ProjectUpdateSerializer, responses={200: ProjectSerializer, **ERROR_RESPONSES},
                   summary="Change a project's settings (name, redaction, retention); project admins only")
    def patch(self, request, slug: str):
        project = self.get_project(slug)
        self.require_perm(project, "change_project")
        ser = ProjectUpdateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = dict(ser.validated_data)
        if "redaction_patterns" in data:
            data["redaction_patterns"] = [dict(p) for p in data["redaction_patterns"]]
        return Response(ProjectSerializer(services.project_update(project=project, actor=request.user,
                                                                  **data)).data)


class MemberListView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    @extend_schema(responses={200: MemberSerializer(many=True), **ERROR_RESPONSES})
    def get(self, request, slug: str):
        project = self.get_project(slug)
        return Response(MemberSerializer(project_members(project), many=True).data)

    @extend_schema(request=RoleGrantSerializer, responses={201: MemberSerializer, **ERROR_RESPONSES},
                   summary="Grant a role")
    def post(self, request, slug: str):
        project = self.get_project(slug)
        self.require_perm(project, "manage_project")
        ser = RoleGrantSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        user = get_object_or_404(get_user_model(), username=ser.validated_data["username"])
        services.role_grant(project=project, user=user, role=ser.validated_data["role"], actor=request.user)
        return Response({"username": user.get_username(), "roles": services.user_roles(user, project)},
                        status=status.HTTP_201_CREATED)


class MemberRoleView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    @extend_schema(responses={204: None, **ERROR_RESPONSES}, summary="Remove a role")
    def delete(self, request, slug: str, username: str, role: str):
        project = self.get_project(slug)
        self.require_perm(project, "manage_project")
        user = get_object_or_404(get_user_model(), username=username)
        ser = RoleGrantSerializer(data={"username": username, "role": role})
        ser.is_valid(raise_exception=True)
        if not services.role_revoke(project=project, user=user, role=role, actor=request.user):
            raise Http404
        return Response(status=status.HTTP_204_NO_CONTENT)


class ApiKeyListView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    @extend_schema(responses={200: ApiKeySerializer(many=True), **ERROR_RESPONSES})
    def get(self, request, slug: str):
        project = self.get_project(slug)
        return Response(ApiKeySerializer(project.api_keys.all(), many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer, **ERROR_RESPONSES},
                   summary="Create an API key (the secret is returned once)")
    def post(self, request, slug: str):
        project = self.get_project(slug)
        self.require_perm(project, "manage_project")
        ser = ApiKeyCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        key, raw = services.api_key_create(project=project, actor=request.user, **ser.validated_data)
        data = ApiKeyCreatedSerializer(key).data | {"key": raw}
        return Response(data, status=status.HTTP_201_CREATED)


class ApiKeyRevokeView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    @extend_schema(request=None, responses={200: ApiKeySerializer, **ERROR_RESPONSES}, summary="Revoke a key")
    def post(self, request, slug: str, key_id: int):
        project = self.get_project(slug)
        self.require_perm(project, "manage_project")
        key = get_object_or_404(ApiKey, pk=key_id, project=project)
        return Response(ApiKeySerializer(services.api_key_revoke(key=key, actor=request.user)).data)


class WebhookSecretOut(serializers.Serializer):
    webhook_secret = serializers.CharField(help_text="Shown once: the key of the HMAC-SHA256 signature on this "
                                                     "project's webhooks (X-Controlplane-Signature).")


class WebhookSecretRotateView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    @extend_schema(request=None, responses={200: WebhookSecretOut, **ERROR_RESPONSES},
                   summary="Replace the project's webhook signing secret (project admins; shown once, audited)")
    def post(self, request, slug: str):
        project = self.get_project(slug)
        self.require_perm(project, "manage_project")
        return Response({"webhook_secret": services.webhook_secret_rotate(project=project, actor=request.user)})
