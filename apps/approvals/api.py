"""Approvals over HTTP. Agents (keys with the ``approvals`` scope) check, request, wait, consume and
cancel; people whose role allows it decide (never a key: ``person_only``); project admins edit the rules
(audited). ``GET /approvals/{id}?wait=`` is answered by ``waiter.py`` in front of Django when served over
ASGI, so that a waiting agent holds no thread; here (no ASGI server) the state is answered at once."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, IDEMPOTENCY_HEADER, idempotency_key, query_params
from apps.common.errors import ErrorCode, ErrorSerializer
from apps.projects.edited_api import EditedRowsView, EditedRowView, documented_row, documented_rows
from apps.projects.permissions import PersonOnly, ProjectScopedAPIView, is_agent, require_scope

from . import selectors, services
from .models import ApprovalRule, nanos
from .serializers import (
    ApprovalIn,
    ApprovalOut,
    AskIn,
    CancelIn,
    CheckOut,
    ConsumeIn,
    ConsumeOut,
    DecideIn,
    ListQuery,
    RuleSerializer,
    WaitQuery,
)

SCOPE = "approvals"
CONFLICTS = {409: OpenApiResponse(ErrorSerializer, description="approval_closed (no longer pending / approved), "
                                                               "approval_expired, action_mismatch, already_decided")}


def _agent(request) -> None:
    if not is_agent(request):
        raise PermissionDenied("Approvals are requested by an API key with the 'approvals' scope.",
                               code=ErrorCode.API_KEY_REQUIRED)
    require_scope(request, SCOPE)


def _cost(d: dict) -> int | None:
    return None if d.get("estimated_cost_usd") is None else nanos(d["estimated_cost_usd"])


# --- rules (project admins) -----------------------------------------------------------------------


@documented_rows(RuleSerializer, plural="approval rules, in the order they are tried", noun="an approval rule")
class RuleListView(EditedRowsView):
    serializer_class = RuleSerializer

    def rows(self, project):
        return selectors.rules_of_project(project)

    def create(self, *, project, actor, values):
        return services.rule_create(project=project, actor=actor, **values)


@documented_row(RuleSerializer, noun="an approval rule",
                changed="; pending approvals keep the rule they were requested under")
class RuleDetailView(EditedRowView):
    serializer_class, model, lookup_url_kwarg = RuleSerializer, ApprovalRule, "rule_id"

    def update(self, row, *, actor, values):
        return services.rule_update(rule=row, actor=actor, **values)

    def remove(self, row, *, actor):
        services.rule_delete(rule=row, actor=actor)


# --- the agent's side -----------------------------------------------------------------------------


class CheckView(ProjectScopedAPIView):
    @extend_schema(summary="Whether an action needs approval (creates nothing)",
                   description="The first enabled rule of the key's project that holds the action (by position).",
                   request=AskIn, responses={200: CheckOut, **ERROR_RESPONSES})
    def post(self, request):
        _agent(request)
        ser = AskIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        rule = services.rule_for(request.user.project_id, services.Ask(
            action=d["action"], tool=d["tool"], agent=d["agent"], end_user=d["end_user"],
            estimated_cost_nanos=_cost(d), risk=d["risk"]))
        return Response({"required": rule is not None, "rule": None if rule is None else RuleSerializer(rule).data})


class ApprovalListView(ProjectScopedAPIView):
    @extend_schema(summary="Approvals, newest first (people: their projects'; keys: their project's)",
                   parameters=[ListQuery], responses={200: ApprovalOut(many=True), **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, SCOPE)
        q = query_params(ListQuery, request)
        rows = selectors.approvals(principal=self.access, project_slug=q.get("project"), state=q.get("state"),
                                   run_id=q.get("run_id"), before=q.get("before"), limit=q["limit"])
        return Response({"results": [selectors.approval_json(a) for a in rows],
                         "next_before": rows[-1].pk if len(rows) == q["limit"] else None})

    @extend_schema(summary="Ask for approval of an action (agent keys, approvals scope)",
                   description="Send an Idempotency-Key: asking again with it (after an interrupt) answers the same "
                               "approval (200), never a second one; with another body, 409 idempotency_conflict. "
                               "The server computes the action hash; wait with GET ?wait=, the WebSocket "
                               "/ws/approvals/{id}, or a callback_url.",
                   parameters=[IDEMPOTENCY_HEADER],
                   request=ApprovalIn, responses={201: ApprovalOut, 200: ApprovalOut, **ERROR_RESPONSES})
    def post(self, request):
        _agent(request)
        ser = ApprovalIn(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        idem = idempotency_key(request)
        body = {**d, "estimated_cost_usd": None if d.get("estimated_cost_usd") is None else str(d["estimated_cost_usd"])}
        done = services.approval_request(
            key=request.user, action=d["action"], arguments=d["arguments"], tool=d["tool"], summary=d["summary"],
            risk=d["risk"], estimated_cost_nanos=_cost(d), agent=d["agent"], end_user=d["end_user"],
            run_id=d["run_id"], span_id=d["span_id"], callback_url=d["callback_url"], idempotency_key=idem,
            body_hash=services.request_hash(body))
        return Response(selectors.approval_json(done.approval),
                        status=status.HTTP_201_CREATED if done.created else status.HTTP_200_OK)


class ApprovalDetailView(ProjectScopedAPIView):
    @extend_schema(summary="An approval, with its decisions; ?wait=N waits up to N seconds for a decision",
                   parameters=[WaitQuery], responses={200: ApprovalOut, **ERROR_RESPONSES})
    def get(self, request, approval_id: str):
        require_scope(request, SCOPE)
        query_params(WaitQuery, request)
        found = selectors.approval(principal=self.access, approval_id=approval_id)
        return Response(selectors.approval_json(found, selectors.decisions_of(found)))


class _Decide(ProjectScopedAPIView):
    permission_classes = [PersonOnly]
    outcome = ""

    def post(self, request, approval_id: str):
        found = selectors.approval(principal=self.access, approval_id=approval_id)
        ser = DecideIn(data=request.data)
        ser.is_valid(raise_exception=True)
        found = services.decide(approval=found, user=request.user, outcome=self.outcome,
                                reason=ser.validated_data["reason"])
        return Response(selectors.approval_json(found, selectors.decisions_of(found)))


class ApproveView(_Decide):
    outcome = "approve"

    @extend_schema(summary="Approve (people whose role allows it; never the requester; audited)",
                   description="Quorum counts distinct approvers; the approval is approved when it is reached. "
                               "403 permission_denied for a role that does not allow it, self_approval for the "
                               "requester (the run's end user, the key's owner).",
                   request=DecideIn, responses={200: ApprovalOut, **ERROR_RESPONSES, **CONFLICTS})
    def post(self, request, approval_id: str):
        return super().post(request, approval_id)


class RejectView(_Decide):
    outcome = "reject"

    @extend_schema(summary="Reject (people whose role allows it; audited): it will never run",
                   request=DecideIn, responses={200: ApprovalOut, **ERROR_RESPONSES, **CONFLICTS})
    def post(self, request, approval_id: str):
        return super().post(request, approval_id)


class ConsumeView(ProjectScopedAPIView):
    @extend_schema(summary="Take an approved action, once (agent keys, approvals scope)",
                   description="Send the action and the arguments that will actually run: the server hashes them "
                               "and compares with what was approved (409 action_mismatch otherwise). Answers a "
                               "short-lived grant, signed with the project's webhook secret, that tools verify "
                               "offline. A second consume: 409 approval_closed.",
                   request=ConsumeIn, responses={200: ConsumeOut, **ERROR_RESPONSES, **CONFLICTS})
    def post(self, request, approval_id: str):
        _agent(request)
        found = selectors.approval(principal=self.access, approval_id=approval_id)
        ser = ConsumeIn(data=request.data)
        ser.is_valid(raise_exception=True)
        found, grant = services.consume(approval=found, key=request.user, action=ser.validated_data["action"],
                                        arguments=ser.validated_data["arguments"])
        return Response({"approval": selectors.approval_json(found), "grant": grant.token,
                         "grant_expires_at": grant.expires_at.isoformat()})


class CancelView(ProjectScopedAPIView):
    @extend_schema(summary="Cancel an approval the agent no longer needs (agent keys): it will never run",
                   request=CancelIn, responses={200: ApprovalOut, **ERROR_RESPONSES, **CONFLICTS})
    def post(self, request, approval_id: str):
        _agent(request)
        found = selectors.approval(principal=self.access, approval_id=approval_id)
        ser = CancelIn(data=request.data)
        ser.is_valid(raise_exception=True)
        return Response(selectors.approval_json(services.cancel(approval=found, key=request.user,
                                                                reason=ser.validated_data["reason"])))
