"""One model call through the gateway, its database side (run in a worker thread by ``app``): who
calls and what may be held for it (``begin``: the key, the routes, the reservation), then what it
cost and what the run log records of it (``finish``: settle or release, one inbox batch).

A call writes the ledger (``budgets``) and the inbox (``traces``), nothing else: its span is
projected like any other trace, carrying ``controlplane.reservation_id`` so that the costs count it
once (the settle already charged it to the budgets)."""
from __future__ import annotations

import copy
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from apps.budgets import ledger
from apps.budgets import services as budgets
from apps.common.errors import ApiError
from apps.common.ttl import TTLCache
from apps.projects.models import ApiKey, hash_api_key
from apps.projects.services import api_key_authenticate
from apps.scheduler import services as queue
from apps.traces import records
from apps.traces import services as traces

from .services import Route, routes_for, served_locally

logger = logging.getLogger(__name__)

TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
REQUIRED_SCOPES = ("budget", "ingest")
# The provider a call served on the project's own GPUs is priced under (a price override names it, or
# names no provider; the price database knows no such provider, so that an unpriced local model holds
# nothing: no one bills it per call).
LOCAL_PROVIDER = "self-hosted"
# What of the messages a span keeps: the conversation in and the answer out, when they fit a record.
_MAX_MESSAGES_BYTES = 256 * 1024


class GatewayError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, code: str, message: str, *, details: dict | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.code, "code": self.code, "param": None,
                          **self.details}}


_keys = TTLCache("GATEWAY_KEY_CACHE_SECONDS")


def authenticate(raw: str | None) -> ApiKey:
    """The presented key (checked against the database at most every GATEWAY_KEY_CACHE_SECONDS per key;
    cached by its keyed hash, never by the secret)."""
    if not raw:
        raise GatewayError(401, "not_authenticated", "Send an API key: Authorization: Bearer <key>.")
    try:
        key = _keys.get(hash_api_key(raw.strip()), lambda: api_key_authenticate(raw))
    except AuthenticationFailed as exc:
        raise GatewayError(401, str(exc.get_codes()), str(exc.detail)) from None
    if key.is_expired:
        raise GatewayError(401, "api_key_expired", "This API key has expired.")
    missing = [s for s in REQUIRED_SCOPES if not key.has_scope(s)]
    if missing:
        raise GatewayError(403, "missing_scope", f"This API key lacks the {', '.join(missing)} scope.")
    return key


@dataclass
class Call:
    key: ApiKey
    endpoint: str  # "chat.completions" | "embeddings"
    model: str
    routes: list[Route]
    run_id: str
    new_run: bool
    parent_span_id: str
    agent: str
    end_user: str
    input_bound: int
    started_at: datetime
    reservation: Any = None
    request_messages: Any = None
    queued: Queued | None = None


@dataclass(frozen=True)
class Queued:
    """The call's task on the GPU queue (a model one of the project's GPU backends serves)."""

    task_pk: int
    task_id: str
    span_id: str


@dataclass
class Attempt:
    """One try of one upstream."""

    route: Route
    span_id: str
    started_at: datetime
    ended_at: datetime | None = None
    ok: bool = False
    error_code: str = ""
    error: str = ""
    usage: dict | None = None
    counted_output_tokens: int = 0
    response_model: str = ""
    ttft_ms: float | None = None
    chunks: int = 0
    output_text: str = ""
    output_message: Any = None
    extra: dict = field(default_factory=dict)


def _id_header(value: str | None, name: str) -> str:
    if value is None:
        return ""
    try:
        return records._id(value, name)
    except records.RecordError as exc:
        raise GatewayError(400, "invalid_request", exc.message if hasattr(exc, "message") else str(exc),
                           details={"param": name}) from None


def begin(*, raw_key: str | None, endpoint: str, body: dict, headers: dict[str, str]) -> Call:
    """Authenticate, route and reserve: raises ``GatewayError`` (401/403/400/404/402/422), or returns
    the call with its reservation held. Database faults propagate (the app answers 503)."""
    try:
        key = authenticate(raw_key)
        model = body.get("model")
        if not isinstance(model, str) or not model or len(model) > 200:
            raise GatewayError(400, "invalid_request", "model: a model name is required.", details={"param": "model"})
        local = served_locally(key.project_id, model)
        if local and not key.has_scope("queue"):
            raise GatewayError(403, "missing_scope", f"'{model}' runs on this project's GPUs: this API key lacks "
                               "the queue scope.")
        routes = [_local_route(model)] if local else routes_for(key.project_id, model)
        if not routes:
            raise GatewayError(404, "model_not_found", f"No upstream of this project serves the model '{model}'.",
                               details={"param": "model"})
        run_id, parent = _id_header(headers.get("x-run-id"), "X-Run-Id"), ""
        match = TRACEPARENT_RE.match(headers.get("traceparent", ""))
        if match and not run_id:
            run_id, parent = match.group(1), match.group(2)
        new_run = not run_id
        run_id = run_id or f"gw-{uuid.uuid4().hex}"
        agent = (headers.get("x-agent-name") or "")[:200]
        user = body.get("user")
        end_user = (headers.get("x-end-user") or (user if isinstance(user, str) else "") or "")[:256]
        if endpoint == "embeddings":
            payload, max_out = body.get("input"), 0
        else:
            payload = body.get("messages")
            if not isinstance(payload, list) or not payload:
                raise GatewayError(400, "invalid_request", "messages: a list of messages is required.",
                                   details={"param": "messages"})
            max_out = body.get("max_completion_tokens") or body.get("max_tokens")
            if max_out is not None and (not isinstance(max_out, int) or isinstance(max_out, bool) or max_out < 1):
                raise GatewayError(400, "invalid_request", "max_tokens: a positive integer.",
                                   details={"param": "max_tokens"})
            max_out = max_out or routes[0].max_output_tokens or budgets.model_limit(model, routes[0].provider)
            if not max_out and not local:
                raise GatewayError(400, "max_tokens_required",
                                   f"Send max_tokens: neither the upstream nor the price database gives '{model}' "
                                   "a limit to hold budget for.", details={"param": "max_tokens"})
        # A token is at least one byte of the UTF-8 text (byte-level BPE): the request's size bounds its
        # prompt from above, as a hold must.
        input_bound = len(json.dumps(payload, ensure_ascii=False).encode())
        now = timezone.now()
        call = Call(key=key, endpoint=endpoint, model=model, routes=routes, run_id=run_id, new_run=new_run,
                    parent_span_id=parent, agent=agent, end_user=end_user, input_bound=input_bound, started_at=now,
                    request_messages=payload if endpoint != "embeddings" else None)
        estimate, ttl = None, None
        if local:
            estimate = _local_estimate(key, model, input_bound, max_out, now)
            ttl = max(settings.BUDGETS_RESERVATION_TTL_SECONDS,
                      int(settings.GATEWAY_QUEUE_WAIT_SECONDS) + settings.SCHEDULER_TASK_TIME_LIMIT)
        try:
            held = budgets.reservation_create(project_id=key.project_id, api_key_id=key.pk, input_tokens=input_bound,
                                              max_output_tokens=max_out, agent=agent, end_user=end_user, model=model,
                                              provider=routes[0].provider, run_id=run_id, now=now,
                                              estimated_nanos=estimate, ttl_seconds=ttl)
        except ledger.BudgetExceeded as exc:
            first = exc.refusals[0]
            raise GatewayError(
                402, "budget_exceeded",
                f"Budget '{first['name']}' would pass its cap: ${first['spent_usd']} spent and ${first['held_usd']} "
                f"held of ${first['cap_usd']} this {first['period']}; it resets at {first['resets_at']}.",
                details={"budget": first, "reservation_id": exc.reservation.pk}) from None
        except budgets.ModelUnpriced as exc:
            raise GatewayError(422, "model_unpriced", str(exc), details={"param": "model"}) from None
        call.reservation = held.reservation
        if local:
            _enqueue(call, body)
        return call
    except DatabaseError:
        connection.close_if_unusable_or_obsolete()  # a broken connection goes back to the pool, not reused
        raise


# --- a model served on the project's own GPUs --------------------------------------------------------


def _local_route(model: str) -> Route:
    return Route(id=0, name="gpu-queue", base_url="", provider=LOCAL_PROVIDER, api_key_env="", patterns=(model,),
                 timeout_seconds=settings.GATEWAY_QUEUE_WAIT_SECONDS, max_output_tokens=None)


def _local_estimate(key: ApiKey, model: str, input_bound: int, max_out: int | None, now: datetime) -> int:
    """What a call on the project's GPUs holds: its price's upper bound where the project prices the model
    (then max_tokens is needed, as for any priced call), else nothing."""
    priced = budgets.estimate(project_id=key.project_id, model=model, provider=LOCAL_PROVIDER,
                              input_tokens=input_bound, max_output_tokens=max_out or 0, now=now)
    if priced is None:
        return 0
    if not max_out:
        raise GatewayError(400, "max_tokens_required",
                           f"Send max_tokens: '{model}' is priced for this project and has no limit to hold "
                           "budget for.", details={"param": "max_tokens"})
    return priced


def _enqueue(call: Call, body: dict) -> None:
    """Submit the call as a task of the GPU queue (chat or embedding), on the run and under the span the
    call records; a refusal releases the reservation and answers as the queue's API would."""
    span_id = uuid.uuid4().hex[:16]
    task_input = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "model")}
    try:
        submitted = queue.submit(
            project=call.key.project, kind="embedding" if call.endpoint == "embeddings" else "chat", model=call.model,
            key=call.key, task_input=task_input, run_id=call.run_id, span_id=span_id, end_user=call.end_user,
            backend_kind="openai")
    except ApiError as exc:
        budgets.reservation_release(reservation=call.reservation)
        raise GatewayError(exc.status_code, str(exc.error_code), str(exc.detail),
                           details={"param": exc.details.get("field")}) from None
    except BaseException:
        budgets.reservation_release(reservation=call.reservation)
        raise
    call.queued = Queued(task_pk=submitted.task.pk, task_id=submitted.task.public_id, span_id=span_id)


# --- after the call -------------------------------------------------------------------------------


def _fits(value: Any) -> bool:
    return records.json_problem(value, limit=_MAX_MESSAGES_BYTES) is None


def _span(call: Call, a: Attempt, previous: Attempt | None) -> dict:
    usage = a.usage or {}
    span: dict[str, Any] = {
        "span_id": a.span_id, "name": f"{call.endpoint} {call.model}", "kind": "llm",
        "start_time": a.started_at.isoformat(), "end_time": (a.ended_at or timezone.now()).isoformat(),
        "status": "ok" if a.ok else "error", "provider": a.route.provider, "model": call.model,
        "endpoint": call.endpoint, "component": "gateway",
        "attributes": {"controlplane.reservation_id": call.reservation.pk if call.reservation else 0,
                       "controlplane.gateway.upstream": a.route.name, **a.extra},
    }
    if call.parent_span_id:
        span["parent_span_id"] = call.parent_span_id
    if a.response_model:
        span["response_model"] = a.response_model[:200]
    if usage:
        span["usage"] = usage
    if a.ttft_ms is not None:
        span["time_to_first_token_ms"] = round(a.ttft_ms, 3)
    if a.chunks:
        seconds = ((a.ended_at or timezone.now()) - a.started_at).total_seconds()
        out = usage.get("output_tokens") or a.counted_output_tokens
        span["stream"] = {"chunks": a.chunks, **({"output_tokens_per_second": round(out / seconds, 3)}
                                                 if seconds > 0 else {})}
    if not a.ok:
        span["error_code"] = a.error_code[:200] or "upstream_error"
        span["status_message"] = a.error[:2000]
    if previous is not None:
        span["fallback_of"] = previous.span_id
    if call.request_messages is not None and _fits(call.request_messages):
        span["input_messages"] = call.request_messages
    if a.output_message is not None and _fits(a.output_message):
        span["output_messages"] = [a.output_message]
    return span


def usage_of(a: Attempt, call: Call) -> dict:
    """What the call used: the upstream's figures, else the tokens counted in the stream and the prompt's
    bound (never nothing: a call that answered is charged)."""
    if a.usage:
        return a.usage
    return {"input_tokens": call.input_bound, "output_tokens": a.counted_output_tokens}


@dataclass
class Finished:
    """A call whose answer the client has: what ``finish_many`` settles and records."""

    call: Call
    attempts: list[Attempt]
    answered: Attempt | None
    client_gone: bool = False


def finish(call: Call, attempts: list[Attempt], *, answered: Attempt | None, client_gone: bool = False) -> None:
    """Settle the reservation with what the answering attempt used (or release it: nothing answered),
    then hand the run log one batch: the run (when the gateway started it), a span per attempt."""
    finish_many([Finished(call, attempts, answered, client_gone)])


def finish_many(done: list[Finished]) -> None:
    """``finish`` for several calls in one transaction (group commit): one commit for all of them and
    one inbox batch per key. Any fault fails them all (the caller retries them one by one)."""
    connection.close_if_unusable_or_obsolete()  # a long-lived thread: past CONN_MAX_AGE, a fresh connection
    # What a settle changes on the reservation objects is undone with the transaction, so that a retry
    # (call by call) settles them again instead of taking them for settled.
    saved = [(d.call, copy.copy(d.call.reservation)) for d in done]
    try:
        with transaction.atomic():  # the records and the settles: one commit
            now = timezone.now()
            by_key: dict[int, tuple[ApiKey, list[dict]]] = {}
            for d in done:
                recs = _records(d.call, d.attempts, d.answered, d.client_gone, now)
                by_key.setdefault(d.call.key.pk, (d.call.key, []))[1].extend(recs)
            for key, recs in by_key.values():
                traces.batch_accept(project=key.project, api_key=key, source="gateway", response={},
                                    records=recs, item_count=len(recs))
            # The ledger's rows last: their locks (which the next reservations wait on) are held from
            # here to the commit only, not through the inbox's writes.
            settles = []
            for d in done:
                if d.answered is None:
                    budgets.reservation_release(reservation=d.call.reservation, now=now)
                else:
                    settles.append((d.call.reservation, _cost(d.call, d.answered), d.answered.usage))
            budgets.reservations_settle(settles, now=now)
    except BaseException as exc:
        for call, reservation in saved:
            call.reservation = reservation
        if isinstance(exc, DatabaseError):
            connection.close_if_unusable_or_obsolete()
        raise


def _cost(call: Call, answered: Attempt) -> int | None:
    """What the answering attempt's usage (``_records`` has read it) cost, or None: no price known."""
    return budgets.price_call(project_id=call.key.project_id, model=call.model, provider=answered.route.provider,
                              usage=answered.usage, when=call.started_at)


def _records(call: Call, attempts: list[Attempt], answered: Attempt | None, client_gone: bool,
             now: datetime) -> list[dict]:
    """The run log's records of the call (the answering attempt's usage read first: its span and its
    settle carry the same)."""
    if answered is not None and not answered.usage:
        answered.usage = usage_of(answered, call)
        answered.extra["controlplane.gateway.usage"] = "counted"
    recs: list[dict] = []
    if call.new_run:
        recs.append({"op": "run.start", "run_id": call.run_id, "agent_name": call.agent, "end_user": call.end_user,
                     "status": "running", "started_at": call.started_at.isoformat(),
                     "metadata": {"source": "gateway"}})
    previous = None
    for a in attempts:
        recs.append({"op": "span", "run_id": call.run_id, "span": _span(call, a, previous)})
        previous = a
    if call.new_run:
        failing = next((a for a in reversed(attempts) if not a.ok), None)
        status = ("completed" if answered is not None and answered.ok else "cancelled" if client_gone
                  else "failed")
        finish_rec = {"op": "run.finish", "run_id": call.run_id, "status": status,
                      "ended_at": max(now, call.started_at + timedelta(microseconds=1)).isoformat()}
        if status == "failed" and failing is not None:
            finish_rec.update(error_code=failing.error_code or "upstream_error", failing_span_id=failing.span_id)
        recs.append(finish_rec)
    for i, rec in enumerate(recs):
        records.validate_record(rec, f"records[{i}]")
    return recs
