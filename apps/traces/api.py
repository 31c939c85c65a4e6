"""The run log's REST API for agents: thin adapters over ``records`` (validate), ``services.batch_accept``
(store durably) and ``selectors`` (read, scoped to the caller).

Writes are for API keys with the ``ingest`` scope; the key decides the project, so a run id is only
ever looked up inside the caller's project (writing to another project's run id writes to a run of
your own project with that id, and reveals nothing). Each write answers 202 once its batch is
committed; reads reflect it once a worker has projected it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from apps.common.api import ERROR_RESPONSES, query_params
from apps.common.errors import ApiError, ErrorCode, ErrorSerializer
from apps.projects.permissions import ProjectScopedAPIView, is_agent, project_param, require_scope

from . import admission, records, selectors, services
from .records import RecordError
from .serializers import (
    AgentFilterSerializer,
    AgentListOut,
    RunAcceptedOut,
    RunDetailOut,
    RunFilterSerializer,
    RunFinishAcceptedOut,
    RunFinishIn,
    RunOut,
    RunStartIn,
    SessionOut,
    SessionToolCallOut,
    SpanIn,
    SpansAcceptedOut,
    SpanUpdateAcceptedOut,
)

IDEMPOTENCY_KEY_MAX = 255

WRITE_RESPONSES = {
    **ERROR_RESPONSES,
    409: OpenApiResponse(ErrorSerializer, description="Idempotency-Key reused with a different body"),
    413: OpenApiResponse(ErrorSerializer, description="Body larger than the request limit"),
}
IDEMPOTENCY_PARAM = OpenApiParameter(
    "Idempotency-Key", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
    description="Same key and body: the first answer again (with Idempotent-Replayed: true). "
                "Same key, other body: 409 idempotency_conflict. Kept 24 hours, per project.")
PROJECT_PARAM = OpenApiParameter("project", OpenApiTypes.STR, description="Project slug, for people who see several.")


# --- writes -----------------------------------------------------------------------------------------


def _writer(request) -> None:
    """An API key with the ``ingest`` scope, admitted as at every other door (rate limit, backlog)."""
    if not is_agent(request):
        raise PermissionDenied("Writing to the run log takes an API key with the 'ingest' scope.",
                               code=ErrorCode.API_KEY_REQUIRED)
    require_scope(request, "ingest")
    try:
        admission.admit(request.user)
    except admission.Refusal as refusal:
        raise ApiError(refusal.error_code, refusal.message, status_code=refusal.status,
                       headers={"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None) from None


def _json_body(request, *, empty_ok: bool = False) -> tuple[bytes, Any]:
    try:
        raw = request.body
    except RequestDataTooBig:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, "The request body is larger than the limit.",
                       status_code=413) from None
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if raw and content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "Send JSON (Content-Type: application/json).",
                       status_code=415)
    if not raw.strip():
        if empty_ok:
            return raw, {}
        raise ApiError(ErrorCode.INVALID_REQUEST, "The request body is empty.", details={"field": "body"})
    try:
        data = json.loads(raw, parse_constant=records.reject_constant, parse_float=records.finite_float)
    except UnicodeDecodeError:
        raise ApiError(ErrorCode.PARSE_ERROR, "The body is not UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise ApiError(ErrorCode.PARSE_ERROR, f"The body is not valid JSON: {exc.msg}.",
                       details={"line": exc.lineno, "column": exc.colno}) from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(ErrorCode.PARSE_ERROR, f"The body is not valid JSON: {exc}.") from None
    # NUL, lone surrogates, depth and ranges are refused field by field by the record validation.
    return raw, data


def _invalid(exc: RecordError) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, f"{exc.field}: {exc.message}",
                    details={"field": exc.field, "fields": {exc.field: [exc.message]}})


def _accept(request, raw: bytes, recs: list[dict], answer: dict) -> Response:
    key = request.user
    idempotency_key = request.headers.get("Idempotency-Key") or None
    if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"Idempotency-Key is longer than {IDEMPOTENCY_KEY_MAX} characters.",
                       details={"field": "Idempotency-Key"})
    request_hash = hashlib.sha256(f"{request.method} {request.path}\n".encode() + raw).hexdigest()
    body, replayed = services.batch_accept(project=key.project, api_key=key, source="rest", records=recs,
                                           response=answer, item_count=len(recs), idempotency_key=idempotency_key,
                                           request_hash=request_hash)
    response = Response(body, status=202)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


# --- reads ------------------------------------------------------------------------------------------


class RunCursor(CursorPagination):
    ordering = ("-started_at", "-id")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 500

    def decode_cursor(self, request):
        try:
            return super().decode_cursor(request)
        except NotFound:
            raise ApiError(ErrorCode.INVALID_REQUEST, "The cursor is not one this API returned.",
                           details={"field": "cursor"}) from None


class SessionCursor(RunCursor):
    ordering = ("started_at", "id")


def _path_id(value: str, *, max_len: int = 128) -> str:
    """A run id from the path: one that could never have been stored is simply not found."""
    if len(value) > max_len or not records.ID_RE.fullmatch(value):
        raise NotFound
    return value


class RunListView(ProjectScopedAPIView):
    """``GET`` lists runs; ``POST`` starts one."""

    @extend_schema(summary="List runs (newest first, cursor-paginated)", parameters=[RunFilterSerializer],
                   responses={200: RunOut(many=True), **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, "read")
        filters = query_params(RunFilterSerializer, request)
        paginator = RunCursor()
        page = paginator.paginate_queryset(selectors.run_list(principal=request.user, filters=filters), request, self)
        return paginator.get_paginated_response(RunOut(page, many=True).data)

    @extend_schema(summary="Start a run", request=RunStartIn, parameters=[IDEMPOTENCY_PARAM],
                   responses={202: RunAcceptedOut, **WRITE_RESPONSES})
    def post(self, request):
        _writer(request)
        raw, data = _json_body(request)
        try:
            rec = records.run_start_record(data, received_at=records.now_iso())
        except RecordError as exc:
            raise _invalid(exc) from None
        run_id = rec["run_id"]
        return _accept(request, raw, [rec], {"run_id": run_id, "trace_id": records.trace_id_for_run(run_id)})


class RunDetailView(ProjectScopedAPIView):
    @extend_schema(summary="A run with its span tree, tool calls and totals", parameters=[PROJECT_PARAM],
                   responses={200: RunDetailOut, **ERROR_RESPONSES})
    def get(self, request, run_id: str):
        require_scope(request, "read")
        run, detail = selectors.run_detail(principal=request.user, run_id=_path_id(run_id),
                                           project_slug=project_param(request))
        return Response({**RunOut(run).data, **detail})


class RunSpansView(ProjectScopedAPIView):
    @extend_schema(summary="Append one span or many", request=SpanIn, parameters=[IDEMPOTENCY_PARAM],
                   description="The body is one span object, a list of span objects, or {\"spans\": [...]}.",
                   responses={202: SpansAcceptedOut, **WRITE_RESPONSES})
    def post(self, request, run_id: str):
        _writer(request)
        raw, data = _json_body(request)
        try:
            recs = records.spans_records(run_id, data, received_at=records.now_iso())
        except RecordError as exc:
            raise _invalid(exc) from None
        return _accept(request, raw, recs, {"run_id": run_id, "span_ids": [r["span"]["span_id"] for r in recs]})


class SpanUpdateView(ProjectScopedAPIView):
    @extend_schema(summary="Close a span or add late fields", request=SpanIn, parameters=[IDEMPOTENCY_PARAM],
                   description="Any span field but its ids; maps (attributes, usage, tool, stream) merge, events "
                               "append. The stored span is not rewritten: the change is appended and merged on read.",
                   responses={202: SpanUpdateAcceptedOut, **WRITE_RESPONSES})
    def patch(self, request, run_id: str, span_id: str):
        _writer(request)
        raw, data = _json_body(request)
        try:
            rec = records.span_update_record(run_id, span_id, data, received_at=records.now_iso())
        except RecordError as exc:
            raise _invalid(exc) from None
        return _accept(request, raw, [rec], {"run_id": run_id, "span_id": span_id})


class RunFinishView(ProjectScopedAPIView):
    @extend_schema(summary="Finish a run", request=RunFinishIn, parameters=[IDEMPOTENCY_PARAM],
                   responses={202: RunFinishAcceptedOut, **WRITE_RESPONSES})
    def post(self, request, run_id: str):
        _writer(request)
        raw, data = _json_body(request, empty_ok=True)
        try:
            rec = records.run_finish_record(run_id, data, received_at=records.now_iso())
        except RecordError as exc:
            raise _invalid(exc) from None
        return _accept(request, raw, [rec], {"run_id": run_id, "status": rec["status"]})


def _session_id(value: str) -> str:
    if len(value) > 256 or "\x00" in value:
        raise NotFound
    return value


class SessionRunsView(ProjectScopedAPIView):
    @extend_schema(summary="A session's runs, oldest first", parameters=[PROJECT_PARAM],
                   responses={200: RunOut(many=True), **ERROR_RESPONSES})
    def get(self, request, session_id: str):
        require_scope(request, "read")
        paginator = SessionCursor()
        page = paginator.paginate_queryset(
            selectors.session_runs(principal=request.user, session_id=_session_id(session_id),
                                   project_slug=project_param(request)), request, self)
        return paginator.get_paginated_response(RunOut(page, many=True).data)


class AgentListView(ProjectScopedAPIView):
    @extend_schema(summary="Each agent version's runs, outcomes, latency and tokens over a window",
                   description="One row per project, agent and version with runs started in [since, until) "
                               "(default: the last 7 days), newest version first within an agent.",
                   parameters=[AgentFilterSerializer], responses={200: AgentListOut, **ERROR_RESPONSES})
    def get(self, request):
        require_scope(request, "read")
        params = query_params(AgentFilterSerializer, request)
        since = params.get("since") or timezone.now() - selectors.AGENT_STATS_WINDOW
        rows = selectors.agent_stats(principal=self.access, project_slug=params.get("project"), since=since,
                                     until=params.get("until"))
        return Response(AgentListOut({"since": since, "until": params.get("until"), "results": rows}).data)


class SessionDetailView(ProjectScopedAPIView):
    @extend_schema(summary="A session: its runs as turns, with tool calls, tokens and cache hit rates",
                   description=f"At most {selectors.SESSION_MAX_TURNS} turns, oldest first (truncated says when "
                               "there were more). 404 when no run you may see has this session id.",
                   parameters=[PROJECT_PARAM], responses={200: SessionOut, **ERROR_RESPONSES})
    def get(self, request, session_id: str):
        require_scope(request, "read")
        session = selectors.session_detail(principal=self.access, session_id=_session_id(session_id),
                                           project_slug=project_param(request))
        return Response(SessionOut(session).data)


class SessionToolCallsView(ProjectScopedAPIView):
    @extend_schema(summary="A session's tool calls, oldest first (cursor-paginated)", parameters=[PROJECT_PARAM],
                   responses={200: SessionToolCallOut(many=True), **ERROR_RESPONSES})
    def get(self, request, session_id: str):
        require_scope(request, "read")
        paginator = SessionCursor()
        page = paginator.paginate_queryset(
            selectors.session_tool_calls(principal=self.access, session_id=_session_id(session_id),
                                         project_slug=project_param(request)), request, self)
        return paginator.get_paginated_response(SessionToolCallOut(page, many=True).data)
