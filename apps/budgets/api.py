"""Costs over HTTP: reads for scripts and agents (``read`` scope) as for the pages; price overrides and
cost settings for project admins (people only), audited by the services."""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, invalid, query_params
from apps.common.errors import ApiError, ErrorCode
from apps.projects.edited_api import EditedRowsView, EditedRowView, documented_row, documented_rows
from apps.projects.permissions import PersonOnly, ProjectScopedAPIView, is_agent, project_param, require_scope

from . import ledger, selectors, services
from .models import Budget, PriceOverride, nanos, usd_text
from .serializers import (
    BudgetSerializer,
    CostQuery,
    CostSettingsSerializer,
    CostsOut,
    PriceOverrideSerializer,
    ReservationIn,
    ReservationOut,
    RunCostOut,
    SettleIn,
    SinceQuery,
    SpikeOut,
    UnpricedOut,
)


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
            raise invalid(exc) from None
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
            raise invalid(exc) from None
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
            raise invalid(exc) from None
        return Response(CostSettingsSerializer(cfg).data)


# --- budgets (project admins) ---------------------------------------------------------------------


@documented_rows(BudgetSerializer, plural="budgets, each with its period in force (spent, held, remaining)",
                 noun="a budget")
class BudgetListView(EditedRowsView):
    serializer_class = BudgetSerializer

    def rows(self, project):
        return selectors.budgets_of_project(project)

    def create(self, *, project, actor, values):
        return services.budget_create(project=project, actor=actor, **values)

    def output(self, data, *, many=False):
        rows = data if many else [data]
        return BudgetSerializer(data, many=many, context={"current": selectors.budgets_current(rows)}).data


@documented_row(BudgetSerializer, noun="a budget", shown=" and its period in force",
                changed=". A new cap applies to the next reservation, in the period in force.")
class BudgetDetailView(EditedRowView):
    serializer_class, model, lookup_url_kwarg = BudgetSerializer, Budget, "budget_id"

    def update(self, row, *, actor, values):
        return services.budget_update(budget=row, actor=actor, **values)

    def remove(self, row, *, actor):
        services.budget_delete(budget=row, actor=actor)

    def output(self, row):
        return BudgetSerializer(row, context={"current": selectors.budgets_current([row])}).data


# --- reservations (the call boundary: agent keys with the budget scope) ----------------------------


def _agent_with_budget_scope(request) -> None:
    if not is_agent(request):
        raise PermissionDenied("Reservations are made by an API key with the 'budget' scope.",
                               code=ErrorCode.API_KEY_REQUIRED)
    require_scope(request, "budget")


def budget_exceeded(exc: ledger.BudgetExceeded) -> ApiError:
    first = exc.refusals[0]
    return ApiError(
        ErrorCode.BUDGET_EXCEEDED,
        f"Budget '{first['name']}' would pass its cap: ${first['spent_usd']} spent and ${first['held_usd']} held "
        f"of ${first['cap_usd']} this {first['period']}; it resets at {first['resets_at']}.",
        status_code=402, details={"budget": first, "refused_by": exc.refusals, "reservation_id": exc.reservation.pk,
                                  "requested_usd": usd_text(exc.requested)})


class ReservationCreateView(ProjectScopedAPIView):
    @extend_schema(summary="Reserve budget before a paid call (agent keys, budget scope)",
                   description="Holds an upper bound of the call's cost under every budget that applies (project, "
                               "agent, end user, model, key), in one conditional write: under any concurrency the "
                               "charged and held sum never passes a hard cap. 402 budget_exceeded names the budget; "
                               "422 model_unpriced for a model with no price (unless the project admits those).",
                   request=ReservationIn, responses={201: ReservationOut, **ERROR_RESPONSES})
    def post(self, request):
        _agent_with_budget_scope(request)
        ser = ReservationIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        key = request.user
        try:
            held = services.reservation_create(
                project_id=key.project_id, api_key_id=key.pk,
                estimated_nanos=None if d.get("estimated_cost_usd") is None else nanos(d["estimated_cost_usd"]),
                input_tokens=d["input_tokens"], max_output_tokens=d.get("max_output_tokens"), agent=d["agent"],
                end_user=d["end_user"], model=d["model"], provider=d["provider"], run_id=d["run_id"],
                ttl_seconds=d.get("ttl_seconds"))
        except ledger.BudgetExceeded as exc:
            raise budget_exceeded(exc) from None
        except services.ModelUnpriced as exc:
            raise ApiError(ErrorCode.MODEL_UNPRICED, str(exc), status_code=422,
                           details={"model": d["model"], "provider": d["provider"]}) from None
        return Response(selectors.reservation_out(held.reservation, held.budgets), status=status.HTTP_201_CREATED)


class ReservationDetailView(ProjectScopedAPIView):
    @extend_schema(summary="A reservation", responses={200: ReservationOut, **ERROR_RESPONSES})
    def get(self, request, reservation_id: int):
        require_scope(request, "budget")
        return Response(selectors.reservation_out(selectors.reservation(principal=self.access,
                                                                        reservation_id=reservation_id)))


def _closed(exc: ledger.ReservationClosed) -> ApiError:
    return ApiError(ErrorCode.RESERVATION_CLOSED, f"The reservation is {exc.reservation.state}.", status_code=409,
                    details={"state": exc.reservation.state})


class ReservationSettleView(ProjectScopedAPIView):
    @extend_schema(summary="Settle a reservation with the call's usage or cost (idempotent)",
                   description="Charges the actual cost (usage priced as the costs price a span) and releases the "
                               "rest. A repeated settle changes nothing and answers the same; an expired "
                               "reservation (charged in full) is reconciled once.",
                   request=SettleIn, responses={200: ReservationOut, **ERROR_RESPONSES})
    def post(self, request, reservation_id: int):
        _agent_with_budget_scope(request)
        reservation = selectors.reservation(principal=self.access, reservation_id=reservation_id)
        ser = SettleIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        try:
            reservation = services.reservation_settle(
                reservation=reservation, cost_nanos=None if d.get("cost_usd") is None else nanos(d["cost_usd"]),
                usage=d.get("usage"))
        except ledger.ReservationClosed as exc:
            raise _closed(exc) from None
        return Response(selectors.reservation_out(reservation))


class ReservationReleaseView(ProjectScopedAPIView):
    @extend_schema(summary="Release a reservation whose call never happened (idempotent)",
                   request=None, responses={200: ReservationOut, **ERROR_RESPONSES})
    def post(self, request, reservation_id: int):
        _agent_with_budget_scope(request)
        reservation = selectors.reservation(principal=self.access, reservation_id=reservation_id)
        try:
            reservation = services.reservation_release(reservation=reservation)
        except ledger.ReservationClosed as exc:
            raise _closed(exc) from None
        return Response(selectors.reservation_out(reservation))
