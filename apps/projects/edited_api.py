"""A project's settings-like rows over HTTP (approval rules, budgets, eval configurations and jobs): read
by whoever may read the project (a key with the ``read`` scope included), added, changed and removed by
its admins only (people holding ``change_project``) through the owning app's audited services. The API's
counterpart of the admin's ``EditedByProjectAdmins``: one path, so that no app's copy drifts.

A subclass names its ``serializer_class`` and its services; ``documented_rows`` and ``documented_row``
give each method its summary, request and responses (the error envelopes included) in the schema.
"""
from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Model
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, invalid

from .models import Project
from .permissions import PersonOnly, ProjectScopedAPIView, require_scope


class EditedRowsView(ProjectScopedAPIView):
    """``GET``: the project's rows; ``POST``: a project admin adds one."""

    serializer_class: type

    def rows(self, project: Project):  # pragma: no cover - abstract
        raise NotImplementedError

    def create(self, *, project: Project, actor, values: dict) -> Model:  # pragma: no cover - abstract
        raise NotImplementedError

    def output(self, data, *, many: bool = False) -> Any:
        return self.serializer_class(data, many=many).data

    def get(self, request, slug: str):
        require_scope(request, "read")
        return Response(self.output(self.rows(self.get_project(slug)), many=True))

    def post(self, request, slug: str):
        PersonOnly().has_permission(request, self)
        project = self.get_project(slug)
        self.require_perm(project, "change_project")
        ser = self.serializer_class(data=request.data)
        ser.is_valid(raise_exception=True)
        try:
            row = self.create(project=project, actor=request.user, values=ser.validated_data)
        except ValidationError as exc:
            raise invalid(exc) from None
        return Response(self.output(row), status=status.HTTP_201_CREATED)


class EditedRowView(ProjectScopedAPIView):
    """``GET`` one row; ``PATCH`` and ``DELETE`` by a project admin. The URL names the row's id in
    ``lookup_url_kwarg``."""

    serializer_class: type
    model: type[Model]
    lookup_url_kwarg: str

    def update(self, row: Model, *, actor, values: dict) -> Model:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self, row: Model, *, actor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def output(self, row: Model) -> Any:
        return self.serializer_class(row).data

    def get_row(self, slug: str, row_id: int) -> Model:
        return get_object_or_404(self.model.objects.select_related("project"), project=self.get_project(slug),
                                 pk=row_id)

    def _editable(self, request, kwargs) -> Model:
        PersonOnly().has_permission(request, self)
        row = self.get_row(kwargs["slug"], kwargs[self.lookup_url_kwarg])
        self.require_perm(row.project, "change_project")
        return row

    def get(self, request, **kwargs):
        require_scope(request, "read")
        return Response(self.output(self.get_row(kwargs["slug"], kwargs[self.lookup_url_kwarg])))

    def patch(self, request, **kwargs):
        row = self._editable(request, kwargs)
        ser = self.serializer_class(row, data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        try:
            row = self.update(row, actor=request.user, values=ser.validated_data)
        except ValidationError as exc:
            raise invalid(exc) from None
        return Response(self.output(row))

    def delete(self, request, **kwargs):
        self.remove(self._editable(request, kwargs), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


READ = "Every role of the project, and API keys of the project with the read scope."
WRITE = ("People holding change_project on the project (its admins); audited. API keys are refused "
         "(person_only).")


def documented_rows(serializer, *, plural: str, noun: str, added: str = ""):
    """The OpenAPI entries of an ``EditedRowsView``'s methods (a class decorator)."""
    return extend_schema_view(
        get=extend_schema(summary=f"A project's {plural}", description=READ,
                          responses={200: serializer(many=True), **ERROR_RESPONSES}),
        post=extend_schema(summary=f"Add {noun} (project admins; audited){added}", description=WRITE,
                           request=serializer, responses={201: serializer, **ERROR_RESPONSES}))


def documented_row(serializer, *, noun: str, shown: str = "", changed: str = "", removed: str = ""):
    """The OpenAPI entries of an ``EditedRowView``'s methods (a class decorator); ``noun`` with its
    article ("an approval rule"), the other words appended to the summaries."""
    return extend_schema_view(
        get=extend_schema(summary=noun[0].upper() + noun[1:] + shown, description=READ,
                          responses={200: serializer, **ERROR_RESPONSES}),
        patch=extend_schema(summary=f"Change {noun} (project admins; audited){changed}", description=WRITE,
                            request=serializer, responses={200: serializer, **ERROR_RESPONSES}),
        delete=extend_schema(summary=f"Remove {noun} (project admins; audited){removed}", description=WRITE,
                             responses={204: None, **ERROR_RESPONSES}))
