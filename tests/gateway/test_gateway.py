"""The model gateway end to end: Daphne serving the gateway on the test database, fake OpenAI
upstreams (real HTTP servers) behind it, the OpenAI SDK and plain HTTP in front. Calls are reserved,
forwarded, answered, settled and traced; a cap refuses before the upstream sees anything; a failing
upstream falls back to the next; a client that leaves mid-stream is still charged what was produced."""
from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from apps.budgets import services as budgets
from apps.budgets.models import BudgetLedger, Reservation, SpanCost
from apps.gateway import services
from apps.traces.models import IngestBatch, Run, Span
from tests.gateway.conftest import needs_postgres, settled
from tests.traces.helpers import drain

pytestmark = [pytest.mark.django_db(transaction=True), needs_postgres]

# gpt-4o: $2.50 in, $10 out per million tokens.
IN, OUT = 2_500, 10_000  # nano-USD per token
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Say five words."}]
PROMPT_TOKENS = 3 + 3 + 3 + 3  # the fake upstream: words + 3 per message


@pytest.fixture
def key(project, make_key):
    return make_key(project, scopes=("budget", "ingest", "read"), name="gateway-agent")


@pytest.fixture
def configured(project, upstream):
    return services.upstream_create(project=project, actor=None, name="primary", base_url=f"{upstream.url}/v1",
                                    provider="openai", model_names=["gpt-4o", "fake-*", "text-embedding-3-small"],
                                    priority=10, timeout_seconds=5)


def sdk(gateway_server, raw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_server}/gateway/v1", api_key=raw, max_retries=0, **kw)


def only_run(calls: int = 1, timeout: float = 10) -> Run:
    """The run of the gateway's calls, once it has recorded them all (it does after answering) and they
    are projected."""
    deadline = time.monotonic() + timeout
    while IngestBatch.objects.filter(source="gateway").count() < calls:
        assert time.monotonic() < deadline, "the gateway recorded nothing"
        time.sleep(0.05)
    drain()
    [run] = Run.objects.all()
    return run


def test_the_openai_sdk_works_unchanged_and_the_call_is_reserved_recorded_and_settled(
        gateway_server, project, key, upstream, configured, alice):
    budgets.budget_create(project=project, actor=alice, name="daily", cap_nanos=10**9)
    client = sdk(gateway_server, key[1])
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=50,
                                                           user="u-42", extra_headers={"X-Agent-Name": "support"})
    answer = raw.parse()
    assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (PROMPT_TOKENS, 5)
    reservation = settled(int(raw.headers["x-controlplane-reservation-id"]))
    cost = PROMPT_TOKENS * IN + 5 * OUT
    assert (reservation.state, reservation.charged_nanos, reservation.agent_name, reservation.end_user) == (
        "settled", cost, "support", "u-42")
    assert reservation.estimate_nanos >= cost  # the hold was an upper bound
    [sent] = upstream.snapshot()
    assert sent["json"]["model"] == "gpt-4o" and "authorization" not in sent["headers"]  # our key stays here

    run = only_run()
    assert run.run_id == raw.headers["x-controlplane-run-id"]
    assert (run.status, run.agent_name, run.end_user, run.cost_usd * 10**9) == ("completed", "support", "u-42", cost)
    [span] = Span.objects.filter(run=run)
    assert (span.kind, span.request_model, span.provider, span.input_tokens, span.output_tokens) == (
        "llm", "gpt-4o", "openai", PROMPT_TOKENS, 5)
    # Counted once: the settle charged the budget; the trace's cost is not added to the ledger again.
    row = BudgetLedger.objects.get()
    assert (row.charged_nanos, row.traced_nanos, row.held_nanos) == (cost, 0, 0)
    assert SpanCost.objects.get().reservation_id == reservation.pk


def test_a_stream_is_passed_on_and_settled_from_its_final_usage_chunk(gateway_server, project, key, upstream,
                                                                       configured):
    client = sdk(gateway_server, key[1])
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert all(c.usage is None for c in chunks)  # the usage chunk was ours to ask for, not the client's
    assert upstream.snapshot()[0]["json"]["stream_options"] == {"include_usage": True}
    run = only_run()
    r = settled(Reservation.objects.get().pk)
    assert r.charged_nanos == PROMPT_TOKENS * IN + 5 * OUT
    [span] = Span.objects.filter(run=run)
    assert span.output_tokens == 5 and span.time_to_first_token_ms is not None

    # A client that asks for the usage chunk gets it.
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5


def test_a_stream_without_a_usage_chunk_is_settled_from_the_tokens_counted_never_zero(
        gateway_server, project, key, upstream, configured):
    upstream.send_usage = False
    client = sdk(gateway_server, key[1])
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50, stream=True))
    r = settled(Reservation.objects.get().pk)
    assert r.usage["output_tokens"] == 5 and r.usage["input_tokens"] > 0
    assert r.charged_nanos == r.usage["input_tokens"] * IN + 5 * OUT > 0
    run = only_run()
    assert Span.objects.get(run=run).attributes["controlplane.gateway.usage"] == "counted"


def test_a_cap_refuses_before_the_upstream_sees_the_request(gateway_server, project, key, upstream, configured,
                                                           alice):
    budgets.budget_create(project=project, actor=alice, name="tiny", cap_nanos=1000)
    client = sdk(gateway_server, key[1])
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert refused.value.status_code == 402
    error = refused.value.body
    assert (error["code"], error["type"], error["budget"]["name"]) == ("budget_exceeded", "budget_exceeded", "tiny")
    assert upstream.snapshot() == []
    assert Reservation.objects.get().state == "refused"


def test_a_failing_upstream_falls_back_to_the_next_and_the_trace_shows_both(
        gateway_server, project, key, upstream, second_upstream, configured):
    services.upstream_create(project=project, actor=None, name="backup", base_url=f"{second_upstream.url}/v1",
                             provider="openai", model_names=["gpt-4o"], priority=20, timeout_seconds=5)
    upstream.fail = "500"
    answer = sdk(gateway_server, key[1]).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert answer.choices[0].message.content.startswith("tok0")
    assert len(upstream.snapshot()) == 1 and len(second_upstream.snapshot()) == 1
    run = only_run()
    failed, fallback = Span.objects.filter(run=run).order_by("start_time")
    assert (failed.status, failed.error_code) == ("error", "upstream_500")
    assert (fallback.status, fallback.fallback_of) == ("ok", failed.span_id)
    assert fallback.attributes["controlplane.gateway.upstream"] == "backup"
    assert run.status == "completed"
    assert settled(Reservation.objects.get().pk).charged_nanos == PROMPT_TOKENS * IN + 5 * OUT

    # A timeout falls back the same way.
    upstream.reset()
    second_upstream.reset()
    services.upstream_update(upstream=configured, actor=None, timeout_seconds=0.5)
    upstream.fail, upstream.hang_seconds = "timeout", 3
    answer = sdk(gateway_server, key[1]).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert answer.choices[0].message.content.startswith("tok0") and len(second_upstream.snapshot()) == 1


def test_when_every_upstream_fails_the_caller_gets_502_and_the_run_shows_the_failing_span(
        gateway_server, project, key, upstream, configured):
    upstream.fail = "close"
    r = httpx.post(f"{gateway_server}/gateway/v1/chat/completions", timeout=10,
                   headers={"Authorization": f"Bearer {key[1]}"},
                   json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_failed"
    assert r.json()["error"]["attempts"][0]["upstream"] == "primary"
    assert settled(Reservation.objects.get().pk).state == "released"
    run = only_run()
    span = Span.objects.get(run=run)
    assert (run.status, run.failing_span_id, span.error_code) == ("failed", span.span_id, "upstream_unreachable")


def test_a_client_that_leaves_mid_stream_is_still_charged_what_was_produced(gateway_server, project, key, upstream,
                                                                            configured):
    upstream.reply_tokens, upstream.chunk_delay = 40, 0.1
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100, "stream": True}).encode()
    host, port = gateway_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /gateway/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {key[1]}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while seen.count(b"tok") < 3:
            seen += s.recv(4096)
    # Gone after a few words: the gateway stops the upstream and settles what it produced.
    assert upstream.wait_for(lambda: upstream.client_disconnects >= 1, timeout=10)
    r = settled(Reservation.objects.get().pk)
    produced = r.usage["output_tokens"]
    assert r.state == "settled" and 3 <= produced < 40
    assert r.charged_nanos == r.usage["input_tokens"] * IN + produced * OUT
    run = only_run()
    assert run.status == "cancelled"
    assert Span.objects.get(run=run).error_code == "client_disconnected"


def test_embeddings_and_the_model_list(gateway_server, project, key, upstream, configured):
    client = sdk(gateway_server, key[1])
    out = client.embeddings.create(model="text-embedding-3-small", input=["one two three", "four"])
    assert len(out.data) == 2 and len(out.data[0].embedding) == 8
    assert settled(Reservation.objects.get().pk).usage == {"input_tokens": 4}
    assert [m.id for m in client.models.list()] == ["gpt-4o", "text-embedding-3-small"]


def test_who_may_call_the_gateway(gateway_server, project, other_project, key, make_key, upstream, configured):
    url = f"{gateway_server}/gateway/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    r = httpx.post(url, json=body, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"
    r = httpx.post(url, json=body, timeout=10, headers={"Authorization": "Bearer cp_nonsense"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    _, ingest_only = make_key(project, scopes=("ingest",), name="no-budget")
    r = httpx.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {ingest_only}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
    # Another project's key reaches only its own project's upstreams (it has none).
    _, theirs = make_key(other_project, scopes=("budget", "ingest"), name="globex")
    r = httpx.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {theirs}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert upstream.snapshot() == [] and not Reservation.objects.exists()
    r = httpx.get(f"{gateway_server}/gateway/v1/chat/completions", timeout=10)
    assert r.status_code == 405
