"""Costs over HTTP: reads for scripts and agents (``read`` scope) as for the pages; price overrides and
cost settings for project admins (people only), audited by the services."""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, query_params
from apps.common.errors import ApiError, ErrorCode
from apps.projects.permissions import PersonOnly, ProjectScopedAPIView, project_param, require_scope

from . import selectors, services
from .models import PriceOverride
from .serializers import (
    CostQuery,
    CostSettingsSerializer,
    CostsOut,
    PriceOverrideSerializer,
    RunCostOut,
    SinceQuery,
    SpikeOut,
    UnpricedOut,
)


def _invalid(exc: ValidationError) -> ApiError:
    errors = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
    field = next(iter(errors))
    return ApiError(ErrorCode.INVALID_REQUEST, f"{field}: {errors[field][0]}", details={"field": field,
                                                                                        "fields": errors})


def _usd(value) -> str:
    return f"{value:.9f}"


def costs_json(data: dict) -> dict:
    """``CostsOut``'s shape, built directly: thousands of rows through DRF's fields cost as much as the
    query (see bench/RESULTS.md)."""
    def row(r: dict) -> dict:
        return {**r, "cost_usd": _usd(r["cost_usd"]), **({"day": r["day"].isoformat()} if "day" in r else {})}

    return {**data, "since": data["since"].isoformat(), "until": data["until"].isoformat(),
            "rows": [row(r) for r in data["rows"]], "total": {**data["total"], "cost_usd": _usd(data["total"]["cost_usd"])}}


class CostsView(ProjectScopedAPIView):
    @extend_schema(summary="Spend, grouped and filtered (from the day rollups)",
                   description="Group by any of project, day, agent, version, end_user, key, model, provider "
                               "(comma-separated, in order); filter by agent, version, end_user, key, model, "
                               "provider; days are each project's (its time zone), since..until inclusive. "
                               "Costs are exact decimals of USD; unpriced calls are counted apart, never as 0.",
                   parameters=[CostQuery], responses={200: CostsOut, **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, "read")
        q = query_params(CostQuery, request)
        data = selectors.costs(principal=self.access, project_slug=q.get("project"), group_by=q["group_by"],
                               since=q.get("since"), until=q.get("until"),
                               filters={k: q.get(k) for k in selectors.FILTERS})
        return Response(costs_json(data))


class RunCostView(ProjectScopedAPIView):
    @extend_schema(summary="A run's cost: its own, its child runs' beside it, and each priced span",
                   responses={200: RunCostOut, **ERROR_RESPONSES})
    def get(self, request, run_id: str):
        require_scope(request, "read")
        return Response(RunCostOut(selectors.run_costs(principal=self.access, run_id=run_id,
                                                       project_slug=project_param(request))).data)


class UnpricedView(ProjectScopedAPIView):
    @extend_schema(summary="Calls that could not be priced, by model and provider (add a price override)",
                   parameters=[SinceQuery], responses={200: UnpricedOut(many=True), **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, "read")
        q = query_params(SinceQuery, request)
        return Response(UnpricedOut(selectors.unpriced(principal=self.access, project_slug=q.get("project"),
                                                       since=q.get("since")), many=True).data)


class SpikeListView(ProjectScopedAPIView):
    @extend_schema(summary="Spend spikes, newest first", parameters=[SinceQuery],
                   responses={200: SpikeOut(many=True), **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, "read")
        q = query_params(SinceQuery, request)
        return Response(SpikeOut(selectors.spikes(principal=self.access, project_slug=q.get("project"),
                                                  since=q.get("since")), many=True).data)


class PriceOverrideListView(ProjectScopedAPIView):
    @extend_schema(summary="A project's price overrides", responses={200: PriceOverrideSerializer(many=True),
                                                                      **ERROR_RESPONSES})
    def get(self, request, slug: str):
        require_scope(request, "read")
        project = self.get_project(slug)
        return Response(PriceOverrideSerializer(PriceOverride.objects.filter(project=project), many=True).data)

    @extend_schema(summary="Add a price override (project admins; audited)", request=PriceOverrideSerializer,
                   responses={201: PriceOverrideSerializer, **ERROR_RESPONSES})
    def post(self, request, slug: str):
        PersonOnly().has_permission(request, self)
        project = self.get_project(slug)
        self.require_perm(project, "change_project")
        ser = PriceOverrideSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        try:
            override = services.price_override_create(project=project, actor=request.user, **ser.validated_data)
        except ValidationError as exc:
            raise _invalid(exc) from None
        return Response(PriceOverrideSerializer(override).data, status=status.HTTP_201_CREATED)


class PriceOverrideDetailView(ProjectScopedAPIView):
    permission_classes = [PersonOnly]

    def _get(self, slug: str, override_id: int) -> PriceOverride:
        project = self.get_project(slug)
        self.require_perm(project, "change_project")
        return get_object_or_404(PriceOverride, project=project, pk=override_id)

    @extend_schema(summary="Change a price override (project admins; audited)", request=PriceOverrideSerializer,
                   responses={200: PriceOverrideSerializer, **ERROR_RESPONSES})
    def patch(self, request, slug: str, override_id: int):
        override = self._get(slug, override_id)
        ser = PriceOverrideSerializer(override, data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        try:
            override = services.price_override_update(override=override, actor=request.user, **ser.validated_data)
        except ValidationError as exc:
            raise _invalid(exc) from None
        return Response(PriceOverrideSerializer(override).data)

    @extend_schema(summary="Remove a price override (project admins; audited)", responses={204: None,
                                                                                          **ERROR_RESPONSES})
    def delete(self, request, slug: str, override_id: int):
        services.price_override_delete(override=self._get(slug, override_id), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class CostSettingsView(ProjectScopedAPIView):
    @extend_schema(summary="A project's cost settings (spikes, disagreement margin, where spikes go)",
                   responses={200: CostSettingsSerializer, **ERROR_RESPONSES})
    def get(self, request, slug: str):
        require_scope(request, "read")
        return Response(CostSettingsSerializer(services.cost_settings_for(self.get_project(slug))).data)

    @extend_schema(summary="Change a project's cost settings (project admins; audited)",
                   request=CostSettingsSerializer, responses={200: CostSettingsSerializer, **ERROR_RESPONSES})
    def patch(self, request, slug: str):
        PersonOnly().has_permission(request, self)
        project = self.get_project(slug)
        self.require_perm(project, "change_project")
        ser = CostSettingsSerializer(data=request.data, partial=True)
        ser.is_valid(raise_exception=True)
        try:
            cfg = services.cost_settings_update(project=project, actor=request.user, **ser.validated_data)
        except ValidationError as exc:
            raise _invalid(exc) from None
        return Response(CostSettingsSerializer(cfg).data)
