"""The fake OpenAI upstream itself: it must speak the API the gateway's tests rely on."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.gateway.fake_openai import FakeOpenAI

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]}]
PROMPT_TOKENS = (2 + 3) + (3 + 3)


@pytest.fixture
def fake():
    with FakeOpenAI(models=("fake-gpt", "fake-mini")) as server:
        yield server


def call(fake: FakeOpenAI, method: str, path: str, body: dict | None = None,
         headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    """(status, headers, raw body) of one request, on `conn` when given (keep-alive) else a new one."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        if own:
            conn.close()


def sse_events(raw: bytes) -> list:
    """The SSE events of a (de-chunked) stream: parsed JSON, and "[DONE]" as is."""
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models(fake):
    status, headers, body = call(fake, "GET", "/v1/models")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"object": "list", "data": [
        {"id": "fake-gpt", "object": "model", "created": 0, "owned_by": "fake"},
        {"id": "fake-mini", "object": "model", "created": 0, "owned_by": "fake"}]}
    assert fake.url == f"http://127.0.0.1:{fake.port}" and fake.port > 0


def test_chat_completion_and_usage(fake):
    status, _, body = call(fake, "POST", "/v1/chat/completions", {"model": "fake-gpt", "messages": MESSAGES})
    assert status == 200
    answer = json.loads(body)
    assert answer["object"] == "chat.completion" and answer["model"] == "fake-gpt" and answer["id"]
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                               "total_tokens": PROMPT_TOKENS + 5}

    _, _, body = call(fake, "POST", "/v1/chat/completions",
                      {"model": "fake-gpt", "messages": MESSAGES, "max_completion_tokens": 3})
    capped = json.loads(body)
    assert capped["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 3


def test_stream_with_usage(fake):
    status, headers, raw = call(fake, "POST", "/v1/chat/completions", {
        "model": "fake-gpt", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    first, *words, finish, usage_chunk, _ = events
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [w["choices"][0]["delta"]["content"] for w in words] == ["tok0 ", "tok1 ", "tok2 ", "tok3 ",
                                                                    "tok4"]
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                                    "total_tokens": PROMPT_TOKENS + 5}


@pytest.mark.parametrize("asks, send_usage", [(False, True), (True, False)])
def test_stream_without_usage(fake, asks, send_usage):
    fake.send_usage = send_usage
    body = {"model": "fake-gpt", "messages": MESSAGES, "stream": True, "max_tokens": 2}
    if asks:
        body["stream_options"] = {"include_usage": True}
    _, _, raw = call(fake, "POST", "/v1/chat/completions", body)
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e and e["choices"] for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "tok0 tok1"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_each_event_is_one_chunk(fake):
    """On the wire: the head, then one HTTP chunk per SSE event, then the zero chunk."""
    body = json.dumps({"model": "fake-gpt", "messages": MESSAGES, "stream": True, "max_tokens": 1}).encode()
    with socket.create_connection((fake.host, fake.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        chunks.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
        if size == 0:
            break
    assert rest == b""
    assert chunks[-1] == b"" and chunks[-2] == b"data: [DONE]\n\n"
    assert len(chunks) == 5  # role, one word, finish, [DONE], zero chunk
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"data: ") == 1
               for c in chunks[:-1])


def test_embeddings(fake):
    status, _, body = call(fake, "POST", "/v1/embeddings", {"model": "fake-emb", "input": ["a b", "c"]})
    assert status == 200
    answer = json.loads(body)
    assert answer["object"] == "list" and answer["model"] == "fake-emb"
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 and d["object"] == "embedding" for d in answer["data"])
    _, _, again = call(fake, "POST", "/v1/embeddings", {"model": "fake-emb", "input": "a b"})
    assert json.loads(again)["data"][0]["embedding"] == answer["data"][0]["embedding"]  # deterministic


def test_fail_500_then_fail_times(fake):
    fake.fail = "500"
    status, _, body = call(fake, "GET", "/v1/models")
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"

    fake.fail_times = 1
    assert call(fake, "GET", "/v1/models")[0] == 500
    assert call(fake, "GET", "/v1/models")[0] == 200
    assert call(fake, "GET", "/v1/models")[0] == 200


def test_fail_close_timeout_and_break_stream(fake):
    fake.fail, fake.fail_times = "close", 1
    with pytest.raises(http.client.RemoteDisconnected):
        call(fake, "GET", "/v1/models")

    fake.fail, fake.fail_times, fake.hang_seconds = "timeout", 1, 0.3
    started = time.monotonic()
    assert call(fake, "GET", "/v1/models")[0] == 200
    assert time.monotonic() - started >= 0.3

    fake.fail, fake.fail_times = "break_stream", 1
    with pytest.raises(http.client.IncompleteRead) as broken:
        call(fake, "POST", "/v1/chat/completions",
             {"model": "fake-gpt", "messages": MESSAGES, "stream": True})
    words = [e for e in sse_events(broken.value.partial) if e["choices"][0]["delta"].get("content")]
    assert len(words) == 2
    assert fake.client_disconnects == 0  # the server broke it, not the client


def test_require_key(fake):
    fake.require_key = "sk-test"
    status, _, body = call(fake, "GET", "/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert call(fake, "GET", "/v1/models", headers={"authorization": "Bearer sk-test"})[0] == 200
    fake.reset()
    assert fake.require_key is None and fake.requests == []


def test_request_log(fake):
    call(fake, "POST", "/v1/chat/completions", {"model": "fake-mini", "messages": MESSAGES},
         headers={"Authorization": "Bearer abc", "X-Trace": "t1"})
    (logged,) = fake.requests
    assert logged["method"] == "POST" and logged["path"] == "/v1/chat/completions"
    assert logged["headers"]["authorization"] == "Bearer abc" and logged["headers"]["x-trace"] == "t1"
    assert logged["json"] == {"model": "fake-mini", "messages": MESSAGES}


def test_keep_alive(fake):
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    try:
        assert call(fake, "GET", "/v1/models", conn=conn)[0] == 200
        sock = conn.sock
        status, headers, _ = call(fake, "POST", "/v1/chat/completions",
                                  {"model": "fake-gpt", "messages": MESSAGES, "stream": True}, conn=conn)
        assert status == 200 and headers["connection"] == "keep-alive"
        assert call(fake, "GET", "/v1/models", conn=conn)[0] == 200
        assert conn.sock is sock  # http.client reopens silently when the server closed: it did not
    finally:
        conn.close()
    assert fake.connections_opened == 1 and len(fake.requests) == 3


def test_client_disconnect_mid_stream(fake):
    fake.reply_tokens, fake.chunk_delay = 1000, 0.02
    body = json.dumps({"model": "fake-gpt", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection((fake.host, fake.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        received = b""
        while b"tok1 " not in received:  # it streams...
            received += sock.recv(65536)
    # ...and notices the client left, long before its 20 s of words are over.
    assert fake.wait_for(lambda: fake.client_disconnects == 1, timeout=2)
