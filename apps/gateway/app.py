"""The model gateway: an OpenAI-compatible ASGI app mounted beside Django at ``/gateway/`` (see
``controlplane.asgi``), so that an agent changes only its base URL and key.

Each call: ``calls.begin`` (the key, the upstreams serving the model, a reservation held for the
call's upper bound; a refusal answers 402 before anything goes upstream) → forward to the first
upstream, falling back to the next on a timeout, a 5xx or a connection error → answer the client →
``calls.finish_many`` on one thread, many calls a commit (settle what was used, or release; the run
log's records). Plain ASGI rather than a Django view: no middleware chain or request object per call,
one shared ``httpx.AsyncClient`` with pooled connections, ``begin`` one hop to a database thread
(reserving is one statement) and ``finish`` one hand-over to the finisher.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from apps.common.dbthreads import DbThreads
from apps.common.errors import RETRY_AFTER_SECONDS
from apps.scheduler import live as queue_live
from apps.scheduler import selectors as queue_selectors
from apps.scheduler import services as queue_services

from . import calls
from .calls import Attempt, Call, GatewayError

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_clients: dict[int, tuple[list[httpx.AsyncClient], itertools.cycle]] = {}


def client() -> httpx.AsyncClient:
    """The next of a few pooled clients of this event loop (Daphne runs one), in turn. A few small pools
    rather than one large one: httpcore's pool looks at every connection it holds for each request and
    each answer, and at every pair of them when they are idle, so its cost grows with the square of its
    size (one pool of 64 connections took most of the web process's CPU at 64 concurrent calls)."""
    loop = id(asyncio.get_running_loop())
    found = _clients.get(loop)
    if found is None:
        shards = settings.GATEWAY_CLIENT_POOLS
        per_pool = max(1, -(-settings.GATEWAY_MAX_CONNECTIONS // shards))
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool, keepalive_expiry=30)
        pools = [httpx.AsyncClient(limits=limits, timeout=None, trust_env=False) for _ in range(shards)]
        found = _clients[loop] = (pools, itertools.cycle(pools))
    return next(found[1])


# The gateway's database work runs on threads of its own, each keeping its connection.
_db = DbThreads("GATEWAY_DB_THREADS", "gateway-db")


async def _json(send: Send, status: int, body: Any, headers: list | None = None) -> None:
    data = json.dumps(body, default=str).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON, (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def _error(send: Send, exc: GatewayError) -> None:
    await _json(send, exc.status, exc.body(), [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()])


def _unavailable() -> GatewayError:
    return GatewayError(503, "service_unavailable", "The budget ledger is unavailable; retry later (no call was made).",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _body(receive: Receive) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > settings.GATEWAY_MAX_BODY_BYTES:
            raise GatewayError(413, "payload_too_large", f"The request is over {settings.GATEWAY_MAX_BODY_BYTES} bytes.")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _raw_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def _call_headers(call: Call) -> list[tuple[bytes, bytes]]:
    return [(b"x-controlplane-run-id", call.run_id.encode()),
            (b"x-controlplane-reservation-id", str(call.reservation.pk).encode())]


def _upstream_headers(route) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if route.api_key_env:
        secret = os.environ.get(route.api_key_env)
        if not secret:
            raise RuntimeError(f"the environment variable {route.api_key_env} is not set")
        headers["authorization"] = f"Bearer {secret}"
    return headers


def _timeout(route) -> httpx.Timeout:
    return httpx.Timeout(route.timeout_seconds, connect=min(route.timeout_seconds, 5.0))


def _usage(raw: Any) -> dict | None:
    """OpenAI's usage object as the run log's (``records.Usage``)."""
    if not isinstance(raw, dict):
        return None
    usage = {}
    for ours, theirs in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        if isinstance(raw.get(theirs), int) and raw[theirs] >= 0:
            usage[ours] = raw[theirs]
    cached = (raw.get("prompt_tokens_details") or {}).get("cached_tokens")
    if isinstance(cached, int) and cached > 0:
        usage["cache_read_tokens"] = cached
    reasoning = (raw.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if isinstance(reasoning, int) and reasoning > 0:
        usage["reasoning_tokens"] = reasoning
    return usage or None


def _fail(a: Attempt, code: str, message: str) -> None:
    a.ok, a.error_code, a.error, a.ended_at = False, code, message, timezone.now()


def _attempt(route) -> Attempt:
    return Attempt(route=route, span_id=uuid.uuid4().hex[:16], started_at=timezone.now())


class _Finisher:
    """One thread per process settles and records the finished calls, as many as are waiting in one
    transaction (``calls.finish_many``): while it commits, the next calls gather, so that under load a
    commit and an inbox batch serve many calls, and alone a call waits for nobody. A group that fails
    is retried call by call, so one bad call fails only itself. The client has its answer already; a
    call never finished (the process died) leaves its reservation held, and it expires charged in full.
    """

    MAX_CALLS = 100

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, done: calls.Finished) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((done, future))
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="gateway-finisher", daemon=True)
                    self._thread.start()
        return future

    def stop(self) -> None:
        """Finish what was handed over, then end the thread and close its connection (tests)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < self.MAX_CALLS and items[-1] is not None:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is None:
                if items[:-1]:
                    self._write(items[:-1])
                connection.close()
                return
            self._write(items)

    def _write(self, items: list) -> None:
        try:
            calls.finish_many([done for done, _ in items])
        except Exception as exc:  # noqa: BLE001 - reported on each call's future
            if len(items) > 1:
                for item in items:
                    self._write([item])
                return
            items[0][1].set_exception(exc)
            return
        for _, future in items:
            future.set_result(None)


_finisher = _Finisher()


async def _finish(call: Call, attempts: list[Attempt], *, answered: Attempt | None, client_gone: bool = False) -> None:
    try:
        await asyncio.wrap_future(_finisher.submit(calls.Finished(call, attempts, answered, client_gone)))
    except Exception:  # the client has its answer; an unsettled reservation expires charged in full
        logger.exception("gateway: could not settle and record the call of run %s", call.run_id)


# --- one answer (chat completions not streamed, embeddings) ---------------------------------------


async def _once(call: Call, body: bytes, path: str, send: Send) -> None:
    attempts: list[Attempt] = []
    for route in call.routes:
        a = _attempt(route)
        attempts.append(a)
        try:
            resp = await client().post(f"{route.base_url}/{path}", content=body, headers=_upstream_headers(route),
                                       timeout=_timeout(route))
        except httpx.TimeoutException as exc:
            _fail(a, "upstream_timeout", f"{route.name}: no answer in {route.timeout_seconds} s ({type(exc).__name__})")
            continue
        except (httpx.HTTPError, RuntimeError) as exc:
            _fail(a, "upstream_unreachable", f"{route.name}: {type(exc).__name__}: {exc}")
            continue
        a.ended_at = timezone.now()
        if resp.status_code >= 500:
            _fail(a, f"upstream_{resp.status_code}", f"{route.name}: HTTP {resp.status_code}: {resp.text[:500]}")
            continue
        if resp.status_code >= 400:  # the request's fault: answered as the upstream did, nothing charged
            _fail(a, f"upstream_{resp.status_code}", f"{route.name}: HTTP {resp.status_code}: {resp.text[:500]}")
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": [*_JSON, (b"content-length", str(len(resp.content)).encode()),
                                    *_call_headers(call)]})
            await send({"type": "http.response.body", "body": resp.content})
            await _finish(call, attempts, answered=None)
            return
        try:
            data = resp.json()
        except ValueError:
            _fail(a, "upstream_bad_response", f"{route.name}: the answer is not JSON")
            continue
        a.ok, a.usage = True, _usage(data.get("usage") if isinstance(data, dict) else None)
        if isinstance(data, dict):
            a.response_model = data.get("model") if isinstance(data.get("model"), str) else ""
            choices = data.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                a.output_message = choices[0].get("message")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_JSON, (b"content-length", str(len(resp.content)).encode()), *_call_headers(call)]})
        await send({"type": "http.response.body", "body": resp.content})
        await _finish(call, attempts, answered=a)
        return
    await _all_failed(call, attempts, send)


async def _all_failed(call: Call, attempts: list[Attempt], send: Send) -> None:
    await _json(send, 502, GatewayError(
        502, "upstream_failed", f"Every upstream serving '{call.model}' failed; nothing was charged.",
        details={"attempts": [{"upstream": a.route.name, "error_code": a.error_code, "message": a.error}
                              for a in attempts]}).body(), _call_headers(call))
    await _finish(call, attempts, answered=None)


# --- a streamed answer ----------------------------------------------------------------------------


async def _watch(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _stream(call: Call, body: dict, receive: Receive, send: Send) -> None:
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    # Ask for the final usage chunk (forwarded only if the client asked for it too).
    upstream_body = json.dumps({**body, "stream_options": {**(body.get("stream_options") or {}),
                                                           "include_usage": True}}).encode()
    attempts: list[Attempt] = []
    for route in call.routes:
        a = _attempt(route)
        attempts.append(a)
        started = time.perf_counter()
        try:
            http = client()
            request = http.build_request("POST", f"{route.base_url}/chat/completions", content=upstream_body,
                                         headers=_upstream_headers(route), timeout=_timeout(route))
            resp = await http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            _fail(a, "upstream_timeout", f"{route.name}: no answer in {route.timeout_seconds} s ({type(exc).__name__})")
            continue
        except (httpx.HTTPError, RuntimeError) as exc:
            _fail(a, "upstream_unreachable", f"{route.name}: {type(exc).__name__}: {exc}")
            continue
        if resp.status_code >= 400:
            content = await resp.aread()
            await resp.aclose()
            _fail(a, f"upstream_{resp.status_code}", f"{route.name}: HTTP {resp.status_code}: {content[:500]!r}")
            if resp.status_code >= 500:
                continue
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": [*_JSON, (b"content-length", str(len(content)).encode()), *_call_headers(call)]})
            await send({"type": "http.response.body", "body": content})
            await _finish(call, attempts, answered=None)
            return
        gone = await _relay(call, a, resp, wants_usage, started, receive, send)
        await _finish(call, attempts, answered=a, client_gone=gone)
        return
    await _all_failed(call, attempts, send)


async def _relay(call: Call, a: Attempt, resp: httpx.Response, wants_usage: bool, started: float,
                 receive: Receive, send: Send) -> bool:
    """Pass the upstream's events on as they come, reading usage and counting tokens on the way;
    returns whether the client went away first (what was produced until then is still charged)."""
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch(receive, gone))
    text: list[str] = []
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                            *_call_headers(call)]})
    buffer = b""
    try:
        async for chunk in resp.aiter_raw():
            buffer += chunk
            out = []
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if _read_event(a, event, text, started, wants_usage):
                    out.append(event + b"\n\n")
            if out:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
            if gone.is_set():
                break
        else:
            a.ok = True
    except httpx.HTTPError as exc:
        _fail(a, "upstream_stream_broken", f"{a.route.name}: the stream broke: {type(exc).__name__}: {exc}")
    finally:
        watcher.cancel()
        await resp.aclose()
    a.ended_at = a.ended_at or timezone.now()
    a.output_message = {"role": "assistant", "content": "".join(text)}
    if gone.is_set():
        _fail(a, "client_disconnected", "the client went away mid-stream")
        return True
    try:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # noqa: BLE001 - gone while we finished
        return True
    return False


def _read_event(a: Attempt, event: bytes, text: list[str], started: float, wants_usage: bool) -> bool:
    """Note what one SSE event tells (usage, the model, content); returns whether to pass it on."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        a.chunks += 1
        if isinstance(obj.get("model"), str) and not a.response_model:
            a.response_model = obj["model"]
        usage = _usage(obj.get("usage"))
        choices = obj.get("choices")
        if usage:
            a.usage = usage
            if not choices and not wants_usage:
                return False  # the usage chunk we asked for, not the client
        for choice in choices or ():
            content = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
            if content:
                if a.ttft_ms is None:
                    a.ttft_ms = (time.perf_counter() - started) * 1000
                a.counted_output_tokens += 1  # a content chunk carries about one token
                text.append(content)
    return True


# --- a call through the GPU queue -----------------------------------------------------------------

# A nudge lost (the channel layer down or a message dropped) delays the answer by at most this.
QUEUE_POLL_SECONDS = 1.0


async def _await_task(call: Call, gone: asyncio.Event) -> queue_selectors.Outcome | None:
    """The task once it ended, or None: the caller went away or the wait ran out. Woken by the task's own
    group (``scheduler.live.task_group``), re-read from the queue of record each time."""
    from channels.layers import get_channel_layer

    loop = asyncio.get_running_loop()
    ends = loop.time() + settings.GATEWAY_QUEUE_WAIT_SECONDS
    layer, channel, group = get_channel_layer(), None, queue_live.task_group(call.queued.task_id)
    try:
        try:  # subscribe first, then read: an end committed in between is in the row or in the group
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
        except Exception as exc:  # noqa: BLE001 - the layer unreachable: read on a timer instead
            logger.warning("gateway: no queue nudges for %s (%r); polling", call.queued.task_id, exc)
            channel = None
        lost = asyncio.ensure_future(gone.wait())
        try:
            while True:
                try:
                    found = await _db(queue_selectors.outcome)(call.queued.task_pk)
                    if found.ended:
                        return found
                except DatabaseError:
                    logger.warning("gateway: could not read task %s; retrying", call.queued.task_id, exc_info=True)
                remaining = ends - loop.time()
                if remaining <= 0 or gone.is_set():
                    return None
                waits = {lost}
                nudged = asyncio.ensure_future(layer.receive(channel)) if channel is not None else None
                if nudged is not None:
                    waits.add(nudged)
                await asyncio.wait(waits, timeout=min(remaining, QUEUE_POLL_SECONDS),
                                   return_when=asyncio.FIRST_COMPLETED)
                if nudged is not None and not nudged.done():
                    nudged.cancel()
                if gone.is_set():
                    return None
        finally:
            lost.cancel()
    finally:
        if channel is not None:
            try:
                await layer.group_discard(group, channel)
            except Exception as exc:  # noqa: BLE001 - the group entry expires anyway
                logger.warning("gateway: leaving %s failed: %r", group, exc)


async def _withdraw(call: Call, reason: str) -> None:
    try:
        await _db(queue_services.withdraw)(task_pk=call.queued.task_pk, actor=f"gateway (key {call.key.name})",
                                           reason=reason)
    except DatabaseError:  # the sweep and the task's own time limit end it; the reservation is released
        logger.warning("gateway: could not withdraw task %s", call.queued.task_id, exc_info=True)


def _queue_headers(call: Call) -> list[tuple[bytes, bytes]]:
    return [*_call_headers(call), (b"x-controlplane-queue-task-id", call.queued.task_id.encode())]


async def _queued(call: Call, body: dict, receive: Receive, send: Send) -> None:
    """The call's task (``calls.begin`` submitted it) waited on until it ends; its result answered as the
    server's own answer (as events when the client asked for a stream). A cancelled task (an operator's
    act) answers 409, a failed one 502; a wait that runs out withdraws the task and answers 503; a client
    that leaves withdraws it too. Only an answered call is charged."""
    route = call.routes[0]
    a = Attempt(route=route, span_id=call.queued.span_id, started_at=call.started_at)
    a.extra["controlplane.queue.task_id"] = call.queued.task_id
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch(receive, gone))
    try:
        done = await _await_task(call, gone)
    finally:
        watcher.cancel()
    if done is None:
        client_gone = gone.is_set()
        reason = ("the caller went away" if client_gone else
                  f"no result in {settings.GATEWAY_QUEUE_WAIT_SECONDS:g} s")
        await _withdraw(call, reason)
        _fail(a, "client_disconnected" if client_gone else "queue_timeout", f"{call.queued.task_id}: {reason}")
        if not client_gone:
            await _json(send, 503, GatewayError(
                503, "queue_timeout", f"The GPU queue did not run the call in {settings.GATEWAY_QUEUE_WAIT_SECONDS:g} s; "
                "its task was withdrawn and nothing was charged. Retry later.",
                details={"task_id": call.queued.task_id}).body(),
                [*_queue_headers(call), (b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
        await _finish(call, [a], answered=None, client_gone=client_gone)
        return
    a.extra.update({"controlplane.queue.backend": done.backend, "controlplane.queue.device": done.device,
                    "controlplane.queue.attempts": done.attempts})
    if done.state != "succeeded" or not isinstance(done.result, dict):
        cancelled = done.state == "cancelled"
        code = "task_cancelled" if cancelled else "backend_failed"
        message = (f"An operator cancelled the call's task {call.queued.task_id}: {done.error_message}" if cancelled
                   else f"The GPU backend {done.backend} failed the call ({done.error_code}): {done.error_message}")
        _fail(a, done.error_code or code, message)
        await _json(send, 409 if cancelled else 502, GatewayError(
            409 if cancelled else 502, code, message + " Nothing was charged.",
            details={"task_id": call.queued.task_id, "task_error_code": done.error_code or None}).body(),
            _queue_headers(call))
        await _finish(call, [a], answered=None)
        return
    result = done.result
    a.ok, a.ended_at = True, done.finished_at or timezone.now()
    a.usage = _usage(result.get("usage"))
    a.response_model = result.get("model") if isinstance(result.get("model"), str) else ""
    choices = result.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        a.output_message = choices[0].get("message")
    if body.get("stream") is True:
        client_gone = await _send_events(call, result, body, send)
        await _finish(call, [a], answered=a, client_gone=client_gone)
        return
    data = json.dumps(result).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [*_JSON, (b"content-length", str(len(data)).encode()), *_queue_headers(call)]})
    await send({"type": "http.response.body", "body": data})
    await _finish(call, [a], answered=a)


def _chunks(result: dict, wants_usage: bool) -> list[dict]:
    """A whole chat completion as the events a stream of it would have sent: each choice's message as one
    delta, then its finish reason, then (when asked) the usage."""
    base = {"id": result.get("id") or f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": result.get("created") or int(time.time()), "model": result.get("model")}
    out = []
    for choice in result.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        delta = {k: v for k, v in message.items() if v is not None}
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [{"index": i, **c} if isinstance(c, dict) else c
                                   for i, c in enumerate(delta["tool_calls"])]
        index = choice.get("index", 0)
        out.append({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        out.append({**base, "choices": [{"index": index, "delta": {},
                                         "finish_reason": choice.get("finish_reason") or "stop"}]})
    if wants_usage and isinstance(result.get("usage"), dict):
        out.append({**base, "choices": [], "usage": result["usage"]})
    return out


async def _send_events(call: Call, result: dict, body: dict, send: Send) -> bool:
    """Answer the result as server-sent events; returns whether the client went away."""
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in _chunks(result, wants_usage))
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                *_queue_headers(call)]})
        await send({"type": "http.response.body", "body": events + b"data: [DONE]\n\n", "more_body": False})
    except Exception:  # noqa: BLE001 - gone before the answer went out: it was produced, so charged
        return True
    return False


# --- the routes -----------------------------------------------------------------------------------


async def _begin(scope: Scope, receive: Receive, endpoint: str) -> tuple[Call, dict]:
    headers = _headers(scope)
    raw = await _body(receive)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise GatewayError(400, "invalid_request", "The body is not JSON.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_request", "The body must be a JSON object.")
    try:
        call = await _db(calls.begin)(raw_key=_raw_key(headers), endpoint=endpoint, body=body, headers=headers)
    except DatabaseError:
        logger.warning("gateway: the ledger is unavailable", exc_info=True)
        raise _unavailable() from None
    return call, body


async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
    call, body = await _begin(scope, receive, "chat.completions")
    if call.queued is not None:
        await _queued(call, body, receive, send)
    elif body.get("stream") is True:
        await _stream(call, body, receive, send)
    else:
        await _once(call, json.dumps(body).encode(), "chat/completions", send)


async def embeddings(scope: Scope, receive: Receive, send: Send) -> None:
    call, body = await _begin(scope, receive, "embeddings")
    if call.queued is not None:
        await _queued(call, body, receive, send)
    else:
        await _once(call, json.dumps(body).encode(), "embeddings", send)


async def list_models(scope: Scope, receive: Receive, send: Send) -> None:
    headers = _headers(scope)

    def models(raw):
        from .services import models_of

        return models_of(calls.authenticate(raw).project_id)

    try:
        names = await _db(models)(_raw_key(headers))
    except DatabaseError:
        raise _unavailable() from None
    await _json(send, 200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                        "owned_by": "controlplane"} for m in names]})


# (path, method) -> handler: the gateway's endpoints (tests/gateway/test_gateway_matrix.py holds each to
# what it requires).
ROUTES: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
    ("/gateway/v1/chat/completions", "POST"): chat_completions,
    ("/gateway/v1/embeddings", "POST"): embeddings,
    ("/gateway/v1/models", "GET"): list_models,
}
_PATHS = {p for p, _ in ROUTES}


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope["path"].rstrip("/")
    handler = ROUTES.get((path, scope["method"]))
    try:
        if handler is None:
            if path in _PATHS:
                raise GatewayError(405, "method_not_allowed", f"{scope['method']} is not allowed here.")
            raise GatewayError(404, "not_found", f"No gateway endpoint at {scope['path']}.")
        await handler(scope, receive, send)
    except GatewayError as exc:
        await _error(send, exc)
    except ConnectionResetError:
        return  # the client left before sending its request
