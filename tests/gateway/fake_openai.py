"""A fake OpenAI upstream: a real HTTP/1.1 server on the standard library (asyncio streams).

It stands in for the provider behind the model gateway: in tests (where a test can make it fail in
several ways and then inspect what it received) and in the benchmark of the gateway's added latency,
so it is built to be fast: one event loop, keep-alive connections, no thread per request, answers
written in one piece.

    with FakeOpenAI(models=("fake-gpt",)) as fake:       # listens on 127.0.0.1, a free port
        base_url = fake.url + "/v1"
        fake.fail, fake.fail_times = "500", 1            # the next request gets a 500, then all is well
        ...
        assert fake.requests[-1]["json"]["model"] == "fake-gpt"

Standalone (the benchmark runs it in its own process): python tests/gateway/fake_openai.py --port 8900

The answers are deterministic: a chat completion is the words "tok0 tok1 ..." (`reply_tokens` of them,
capped by max_tokens), or `reply_text` when set (its words, split on spaces, so that it comes back as it was
sent when no cap cuts it; a callable gets the request's body), prompt_tokens is the number of words in the messages plus 3 a message, and an
embedding is 8 floats derived from a hash of its input.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

logger = logging.getLogger(__name__)

FailMode = Literal["500", "timeout", "close", "break_stream"]

_HEAD_LIMIT = 64 * 1024  # request line + headers; larger heads get 431
_BODY_LIMIT = 64 * 1024 * 1024  # larger bodies get 413
_POLL_S = 0.05  # how often a pause looks whether the client went away
_EMBEDDING_DIMS = 8


@dataclass(slots=True)
class _Request:
    method: str
    target: str  # as sent: path and query
    path: str  # without the query
    headers: dict[str, str]  # names lower-cased
    json: Any  # the parsed body, or None (no body, or not JSON)
    keep_alive: bool


class FakeOpenAI:
    """An OpenAI-compatible HTTP server in a background thread (or standalone): see the module docstring.

    The behaviour knobs are plain attributes, read at each request, so a test sets them on a running
    server; `reset()` puts them back to how the constructor left them.
    """

    def __init__(self, models: Iterable[str] = ("fake-gpt",), port: int = 0, *, host: str = "127.0.0.1",
                 require_key: str | None = None) -> None:
        self.models: list[str] = list(models)
        self.host = host
        self.port = port  # the real port once listening (when 0 was asked for)
        self._default_require_key = require_key

        # What it received. `requests` is appended to by the server thread under `_lock`; read it freely
        # (list appends are atomic) or take `snapshot()` of it.
        self.requests: list[dict[str, Any]] = []
        self.client_disconnects = 0  # streams the client left before their end
        self.connections_opened = 0  # TCP connections accepted (shows whether a client reuses them)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

        self._set_defaults()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    def _set_defaults(self) -> None:
        self.reply_tokens = 5  # words in an answer (before max_tokens caps it)
        # The answer's text instead of "tok0 tok1 ...": a string, or a callable of the request's body.
        self.reply_text: str | Callable[[dict[str, Any]], str] | None = None
        self.send_usage = True  # whether a stream that asks for usage (stream_options) gets it
        self.first_token_delay = 0.0  # seconds between the response head and the first word
        self.chunk_delay = 0.0  # seconds before each further word (non-streamed answers wait the sum)
        self.fail: FailMode | None = None
        self.fail_times: int | None = None  # None: `fail` applies to every request; n: to the next n only
        self.hang_seconds = 30.0  # how long fail="timeout" waits before answering
        self.require_key: str | None = self._default_require_key

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, without /v1."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOpenAI:
        """Listen in an event loop on a daemon thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeOpenAI is already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # e.g. the port is taken: hand it to start()
                failure.append(exc)
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-openai-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 5) -> None:
        """Stop listening, drop every open connection (hanging answers included) and end the thread."""
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def serve_forever(self) -> None:
        """Serve in the running event loop until cancelled (the standalone entry point)."""
        server = await self._listen()
        print(self.url, flush=True)  # a parent process may wait for this line
        async with server:
            await server.serve_forever()

    async def _listen(self) -> asyncio.Server:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port,
                                                  limit=_HEAD_LIMIT, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self._server

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        # Before 3.12, Server.close() leaves accepted connections open: end their tasks ourselves.
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    # -- for tests ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the recorded requests and counters; put every knob back to its constructor value."""
        with self._lock:
            self.requests.clear()
            self.client_disconnects = 0
            self.connections_opened = 0
        self._set_defaults()

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of the requests received so far."""
        with self._lock:
            return list(self.requests)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5) -> bool:
        """Wait until `predicate()` holds (e.g. a counter the server thread updates); False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _take_failure(self) -> FailMode | None:
        """The failure this request gets, counting it down when `fail_times` limits them."""
        with self._lock:
            mode = self.fail
            if mode is None:
                return None
            if self.fail_times is not None:
                if self.fail_times <= 0:
                    return None
                self.fail_times -= 1
            return mode

    # -- HTTP --------------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        with self._lock:
            self.connections_opened += 1
        try:
            while True:
                request = await self._read_request(reader, writer)
                if request is None or not await self._handle(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            # stop() cancels us. End normally: 3.11's StreamReaderProtocol calls task.exception() on the
            # finished handler and would log the CancelledError as an error.
            pass
        except Exception:
            logger.exception("fake OpenAI server: unexpected error")
        finally:
            self._conn_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> _Request | None:
        """The next request on the connection, or None when the connection is to end (EOF, bad request)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # closed between requests (idle keep-alive) or mid-head
        except asyncio.LimitOverrunError:
            await self._send_json(writer, 431, _error("Request header fields too large."), keep_alive=False)
            return None
        # Stray CRLFs before a request line are allowed (RFC 9112 §2.2).
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            await self._send_json(writer, 400, _error("Malformed request line."), keep_alive=False)
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                await self._send_json(writer, 400, _error("Malformed header line."), keep_alive=False)
                return None
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens

        if "transfer-encoding" in headers:  # chunked request bodies: not needed, not supported
            await self._send_json(writer, 501, _error("Chunked request bodies are not supported."),
                                  keep_alive=False)
            return None
        try:
            length = int(headers.get("content-length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            await self._send_json(writer, 400, _error("Invalid Content-Length."), keep_alive=False)
            return None
        if length > _BODY_LIMIT:
            await self._send_json(writer, 413, _error("Request body too large."), keep_alive=False)
            return None
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(length) if length else b""

        parsed: Any = None
        if body:
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
        return _Request(method=method.upper(), target=target, path=target.split("?", 1)[0],
                        headers=headers, json=parsed, keep_alive=keep_alive)

    def _head(self, status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 f"x-request-id: req_fake_{next(self._ids)}",
                 f"connection: {'keep-alive' if keep_alive else 'close'}"]
        lines += [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, payload: Any, *,
                         keep_alive: bool, broken: bool = False) -> bool:
        """Answer with a JSON body; returns whether the connection stays open. `broken` sends the head and
        half the body, then gives up (the caller closes)."""
        body = _dumps(payload)
        head = self._head(status, [("content-type", "application/json"),
                                   ("content-length", str(len(body)))], keep_alive)
        writer.write(head + (body[: len(body) // 2] if broken else body))
        await writer.drain()
        return keep_alive and not broken

    async def _pause(self, seconds: float, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        """Sleep `seconds`, watching the client; False as soon as it has gone away (checked even at 0)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            # A client that closed shows as EOF on the reader (FIN) or a closing transport (reset). No
            # request can be pending while we answer (HTTP/1.1 without pipelining), so EOF means gone.
            if writer.is_closing() or reader.at_eof() or reader.exception() is not None:
                return False
            left = deadline - loop.time()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, _POLL_S))

    # -- the API -----------------------------------------------------------------------------------------

    async def _handle(self, req: _Request, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request; returns whether the connection stays open."""
        with self._lock:
            self.requests.append({"method": req.method, "path": req.path, "headers": req.headers,
                                  "json": req.json})
        keep = req.keep_alive

        if self.require_key is not None and req.headers.get("authorization") != f"Bearer {self.require_key}":
            return await self._send_json(
                writer, 401, _error("Incorrect API key provided.", code="invalid_api_key"), keep_alive=keep)

        mode = self._take_failure()
        if mode == "500":
            return await self._send_json(
                writer, 500, _error("The server had an error while processing your request.",
                                    type_="server_error"), keep_alive=keep)
        if mode == "close":
            return False  # the caller closes the connection: no answer at all
        if mode == "timeout" and not await self._pause(self.hang_seconds, reader, writer):
            return False
        broken = mode == "break_stream"

        route = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/embeddings": "POST"}
        if req.path not in route:
            return await self._send_json(
                writer, 404, _error(f"Unknown request URL: {req.method} {req.path}.", code="unknown_url"),
                keep_alive=keep)
        if req.method != route[req.path]:
            return await self._send_json(
                writer, 405, _error(f"Method {req.method} not allowed on {req.path}."), keep_alive=keep)

        if req.path == "/v1/models":
            payload = {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]}
            return await self._send_json(writer, 200, payload, keep_alive=keep, broken=broken)

        body = req.json
        if not isinstance(body, dict):
            return await self._send_json(writer, 400, _error("The body must be a JSON object."),
                                         keep_alive=keep)
        if not isinstance(body.get("model"), str):
            return await self._send_json(
                writer, 400, _error("You must provide a model parameter.", param="model"), keep_alive=keep)
        if req.path == "/v1/embeddings":
            return await self._embeddings(body, writer, keep, broken)
        return await self._chat(body, reader, writer, keep, broken)

    async def _embeddings(self, body: dict[str, Any], writer: asyncio.StreamWriter, keep: bool,
                          broken: bool) -> bool:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            return await self._send_json(
                writer, 400, _error("'input' must be a string or a non-empty list of strings.",
                                    param="input"),
                keep_alive=keep)
        as_base64 = body.get("encoding_format") == "base64"  # what the openai SDK asks for by default
        data = []
        for index, text in enumerate(inputs):
            vector = _embedding(text)
            encoded: Any = (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                            if as_base64 else vector)
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(text.split()) for text in inputs)
        payload = {"object": "list", "data": data, "model": body["model"],
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return await self._send_json(writer, 200, payload, keep_alive=keep, broken=broken)

    async def _chat(self, body: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    keep: bool, broken: bool) -> bool:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return await self._send_json(
                writer, 400, _error("'messages' must be a non-empty list of objects.", param="messages"),
                keep_alive=keep)
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
            return await self._send_json(
                writer, 400, _error("max_tokens must be a non-negative integer.", param="max_tokens"),
                keep_alive=keep)

        reply = self.reply_text(body) if callable(self.reply_text) else self.reply_text
        every = reply.split(" ") if reply is not None else [f"tok{k}" for k in range(self.reply_tokens)]
        n = len(every) if cap is None else min(len(every), cap)
        finish_reason = "length" if n < len(every) else "stop"
        words = every[:n]
        prompt_tokens = sum(_content_words(m.get("content")) + 3 for m in messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        completion_id = f"chatcmpl-fake{next(self._ids)}"
        created = int(time.time())
        model = body["model"]

        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = (isinstance(options, dict) and options.get("include_usage") is True
                             and self.send_usage)
            return await self._stream_chat(reader, writer, keep, broken, completion_id, created, model, words,
                                           finish_reason, usage if include_usage else None)

        # Not streamed: take as long as the stream would have, then answer in one piece.
        delay = self.first_token_delay + self.chunk_delay * max(n - 1, 0)
        if delay and not await self._pause(delay, reader, writer):
            return False
        payload = {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage,
        }
        return await self._send_json(writer, 200, payload, keep_alive=keep, broken=broken)

    async def _stream_chat(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bool,
                           broken: bool, completion_id: str, created: int, model: str, words: list[str],
                           finish_reason: str, usage: dict[str, int] | None) -> bool:
        """Server-Sent Events, one event per HTTP chunk. Timing: the head goes at once; after
        `first_token_delay` the role chunk and the first word; `chunk_delay` before each further word;
        then the finish chunk, the usage chunk (when asked for and `send_usage`) and [DONE]."""

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            event: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk",
                                     "created": created, "model": model, "choices": choices}
            if usage is not None:
                event["usage"] = None  # as OpenAI does: null on every chunk but the last, when usage is on
            return event

        def choice(delta: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        writer.write(self._head(200, [("content-type", "text/event-stream; charset=utf-8"),
                                      ("cache-control", "no-cache"),
                                      ("transfer-encoding", "chunked")], keep))
        try:
            await writer.drain()
            if not await self._pause(self.first_token_delay, reader, writer):
                return self._client_left()
            await _send_chunk(writer, _sse(chunk(choice({"role": "assistant", "content": ""}))))
            for k, word in enumerate(words):
                if broken and k == 2:
                    return False  # fail="break_stream": the caller closes with the stream unfinished
                if k and not await self._pause(self.chunk_delay, reader, writer):
                    return self._client_left()
                text = word if k == len(words) - 1 else word + " "
                await _send_chunk(writer, _sse(chunk(choice({"content": text}))))
            if broken:
                return False  # fewer than 2 words: break after what there was
            if not await self._pause(0, reader, writer):
                return self._client_left()
            await _send_chunk(writer, _sse(chunk(choice({}, finish_reason))))
            if usage is not None:
                await _send_chunk(writer, _sse({**chunk([]), "usage": usage}))
            await _send_chunk(writer, b"data: [DONE]\n\n")
            await _send_chunk(writer, b"")  # the last chunk
        except ConnectionError:  # ConnectionResetError, BrokenPipeError: the client went away
            return self._client_left()
        return keep

    def _client_left(self) -> bool:
        with self._lock:
            self.client_disconnects += 1
        return False


# -- helpers -----------------------------------------------------------------------------------------------


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(event) + b"\n\n"


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One HTTP/1.1 chunk (an empty `data` is the terminating zero chunk)."""
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


def _error(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _content_words(content: Any) -> int:
    """Words in a message's content: a string, or a list of parts of which the text parts count."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(len(part["text"].split()) for part in content if isinstance(part, dict)
                   and part.get("type") == "text" and isinstance(part.get("text"), str))
    return 0  # None (an assistant message with tool calls) and anything else


def _embedding(text: str) -> list[float]:
    """8 floats in [-1, 1), the same for the same text in every process (unlike hash())."""
    digest = hashlib.sha256(text.encode()).digest()
    words = struct.unpack(f">{_EMBEDDING_DIMS}I", digest[: 4 * _EMBEDDING_DIMS])
    return [round(n / 2**31 - 1, 6) for n in words]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream (prints its URL).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--models", default="fake-gpt", help="comma-separated model names")
    parser.add_argument("--reply-tokens", type=int, default=5)
    parser.add_argument("--first-token-delay", type=float, default=0.0, help="seconds")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds")
    parser.add_argument("--require-key", default=None)
    args = parser.parse_args(argv)

    fake = FakeOpenAI(models=[m.strip() for m in args.models.split(",") if m.strip()], port=args.port,
                      host=args.host, require_key=args.require_key)
    fake.reply_tokens = args.reply_tokens
    fake.first_token_delay = args.first_token_delay
    fake.chunk_delay = args.chunk_delay
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(fake.serve_forever())


if __name__ == "__main__":
    main()
