"""The gateway routing a model served on the project's own GPUs through the queue, end to end: Daphne
serving the gateway, a real prefork Celery worker (with beat) consuming the declared GPU's queue, and a
fake OpenAI-compatible server (a real HTTP server) as the GPU backend the worker calls. The agent changes
nothing: the OpenAI SDK asks the gateway, which submits a chat or embedding task, waits for it and answers
its result (as events when asked to stream); the run shows the gateway's span with the queue's spans under
it; operators' cancels, failures, waits that run out and callers that leave all end with nothing charged.
"""
from __future__ import annotations

import datetime as dt
import threading
import time

import httpx
import openai
import pytest

from apps.budgets import services as budgets
from apps.budgets.models import Reservation
from apps.projects import services as project_services
from apps.projects.models import Role
from apps.scheduler import services as queue
from apps.scheduler.models import QueueTask
from apps.traces.models import Span
from tests.gateway.conftest import needs_postgres, serve_gateway, settled
from tests.gateway.fake_openai import FakeOpenAI
from tests.traces.helpers import drain
from tests.traces.workers import purge_queue, start_worker, stop_worker

pytestmark = [pytest.mark.django_db(transaction=True), needs_postgres]

QUEUES = "default,gpu.declared.gpu0"
ENV = {"SCHEDULER_GPUS": "declared", "SCHEDULER_DECLARED_GPUS": "gpu0:10512", "SCHEDULER_TICK_SECONDS": "1",
       "SCHEDULER_LEASE_SECONDS": "3", "SCHEDULER_HEARTBEAT_SECONDS": "0.2", "SCHEDULER_CLAIM_GRACE_SECONDS": "3"}
WAIT_SECONDS = 5  # the gateway's GATEWAY_QUEUE_WAIT_SECONDS in this module
MESSAGES = [{"role": "user", "content": "Say five words."}]
MODEL = "llama-local"
EMBEDDER = "embed-local"


@pytest.fixture(scope="module")
def gateway_server(django_db_setup, django_db_blocker, tmp_path_factory):
    yield from serve_gateway(tmp_path_factory, GATEWAY_QUEUE_WAIT_SECONDS=str(WAIT_SECONDS))


@pytest.fixture
def gpu_server():
    with FakeOpenAI(models=(MODEL, EMBEDDER)) as server:
        yield server


@pytest.fixture
def worker(tmp_path):
    for name in QUEUES.split(","):
        purge_queue(name)
    proc = start_worker(tmp_path, "gpu", beat=True, queues=QUEUES, env=ENV, concurrency=2)
    yield proc
    stop_worker(proc)


@pytest.fixture
def backend(project, alice, gpu_server):
    device = queue.device_create(project=project, actor=alice, name="gpu0", gpu="declared:gpu0", memory_mb=10_512,
                                 headroom_mb=512)
    return queue.backend_create(project=project, actor=alice, name="vllm", device=device, kind="openai",
                                url=f"{gpu_server.url}/v1", concurrency=2, model_memory={
                                    MODEL: {"load_mb": 4000, "request_mb": 500},
                                    EMBEDDER: {"load_mb": 1000, "request_mb": 100},
                                    "too-big": {"load_mb": 9000, "request_mb": 2000}})


@pytest.fixture
def key(project, make_key):
    return make_key(project, scopes=("budget", "ingest", "queue", "read"), name="gpu-agent")


@pytest.fixture
def olga(django_user_model, project, alice):
    user = django_user_model.objects.create_user("olga", password="pw-olga")
    project_services.role_grant(project=project, user=user, role=Role.OPERATOR, actor=alice)
    return user


def sdk(base, raw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/gateway/v1", api_key=raw, max_retries=0, timeout=30)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


def gateway_spans(run_id: str) -> list[Span]:
    def recorded():
        drain()
        return Span.objects.filter(run__run_id=run_id, kind="llm").exists()

    wait_until(recorded, 10, "the gateway's span")
    return list(Span.objects.filter(run__run_id=run_id).order_by("start_time", "pk"))


def test_a_call_for_a_local_model_runs_as_a_queue_task_and_is_answered_charged_and_traced(
        gateway_server, project, alice, key, backend, gpu_server, worker):
    # The project prices its own GPUs' model: $1 in, $2 out per million tokens (no provider named).
    budgets.price_override_create(project=project, actor=alice, model_pattern=MODEL, effective_from=dt.date(2020, 1, 1),
                                  input_per_mtok=1, output_per_mtok=2)
    raw = sdk(gateway_server, key[1]).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=50, extra_headers={"X-Agent-Name": "local-agent"})
    answer = raw.parse()
    assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    task = QueueTask.objects.get(public_id=raw.headers["x-controlplane-queue-task-id"])
    run_id = raw.headers["x-controlplane-run-id"]
    assert (task.state, task.kind, task.model, task.backend.name, task.run_id, task.requested_by) == (
        "succeeded", "chat", MODEL, "vllm", run_id, "key gpu-agent")
    assert "stream" not in task.input and task.input["messages"] == MESSAGES
    # The worker called the GPU backend once, with the model.
    [sent] = [r for r in gpu_server.snapshot() if r["path"] == "/v1/chat/completions"]
    assert sent["json"]["model"] == MODEL and sent["json"]["max_tokens"] == 50
    # Charged at the project's price for what was used.
    r = settled(int(raw.headers["x-controlplane-reservation-id"]))
    assert (r.state, r.provider, r.charged_nanos) == (
        "settled", "self-hosted", answer.usage.prompt_tokens * 1_000 + answer.usage.completion_tokens * 2_000)
    # One trace: the gateway's model call, the queue's task and attempt under it.
    spans = gateway_spans(run_id)
    llm = next(s for s in spans if s.kind == "llm")
    assert (llm.span_id, llm.attributes["controlplane.queue.task_id"], llm.attributes["controlplane.queue.backend"]) == (
        task.span_id, task.public_id, "vllm")
    assert {s.name for s in spans if s.parent_span_id == llm.span_id} == {"queue.task", "queue.attempt"}


def test_a_stream_is_answered_as_events_with_its_usage_and_embeddings_go_through_the_queue(
        gateway_server, key, backend, gpu_server, worker):
    client = sdk(gateway_server, key[1])
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3
    # The GPU backend was asked for a whole answer (the worker does not stream).
    [sent] = [r for r in gpu_server.snapshot() if r["path"] == "/v1/chat/completions"]
    assert "stream" not in sent["json"]

    vectors = client.embeddings.create(model=EMBEDDER, input=["one two", "three"])
    assert len(vectors.data) == 2 and vectors.usage.prompt_tokens == 3
    assert QueueTask.objects.filter(kind="embedding", state="succeeded", model=EMBEDDER).count() == 1
    # The models list names what the GPUs serve.
    assert {m.id for m in client.models.list()} >= {MODEL, EMBEDDER, "too-big"}


def test_an_operators_cancel_answers_409_and_charges_nothing(gateway_server, project, key, backend, olga, worker):
    queue.control_set(project=project, user=olga, paused=True, reason="maintenance")
    answers = {}

    def ask():
        answers["r"] = httpx.post(f"{gateway_server}/gateway/v1/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {key[1]}"},
                                  json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5})

    caller = threading.Thread(target=ask)
    caller.start()
    task = wait_until(lambda: QueueTask.objects.filter(model=MODEL).first(), 10, "the call's task")
    queue.cancel(task=task, user=olga, reason="not now")
    caller.join(15)
    r = answers["r"]
    assert (r.status_code, r.json()["error"]["code"]) == (409, "task_cancelled")
    assert "not now" in r.json()["error"]["message"]
    assert settled(int(r.headers["x-controlplane-reservation-id"])).state == "released"


def test_a_failing_backend_answers_502_and_charges_nothing(gateway_server, key, backend, gpu_server, worker):
    gpu_server.fail = "500"
    r = httpx.post(f"{gateway_server}/gateway/v1/chat/completions", timeout=30,
                   headers={"Authorization": f"Bearer {key[1]}"},
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5})
    body = r.json()["error"]
    assert (r.status_code, body["code"], body["task_error_code"]) == (502, "backend_failed", "backend_error")
    assert QueueTask.objects.get(public_id=body["task_id"]).state == "failed"
    assert settled(int(r.headers["x-controlplane-reservation-id"])).state == "released"


def test_a_wait_that_runs_out_withdraws_the_task_and_answers_503(gateway_server, project, key, backend, olga):
    queue.control_set(project=project, user=olga, paused=True, reason="maintenance")
    started = time.monotonic()
    r = httpx.post(f"{gateway_server}/gateway/v1/chat/completions", timeout=30,
                   headers={"Authorization": f"Bearer {key[1]}"},
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5})
    assert time.monotonic() - started >= WAIT_SECONDS
    assert (r.status_code, r.json()["error"]["code"], r.headers["retry-after"]) == (503, "queue_timeout", "5")
    task = QueueTask.objects.get(public_id=r.json()["error"]["task_id"])
    assert (task.state, task.error_code) == ("cancelled", "withdrawn")
    assert task.history.filter(event="withdrawn", actor="gateway (key gpu-agent)").exists()
    assert settled(int(r.headers["x-controlplane-reservation-id"])).state == "released"


def test_a_caller_that_leaves_withdraws_its_task(gateway_server, project, key, backend, olga):
    queue.control_set(project=project, user=olga, paused=True, reason="maintenance")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway_server}/gateway/v1/chat/completions", timeout=1,
                   headers={"Authorization": f"Bearer {key[1]}"},
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5})
    task = wait_until(lambda: QueueTask.objects.filter(model=MODEL, state="cancelled").first(), 4,
                      "the task withdrawn")
    assert task.error_code == "withdrawn"
    assert wait_until(lambda: not Reservation.objects.filter(state="held").exists(), 5, "the hold released")
    assert Reservation.objects.get().state == "released"


def test_refusals_hold_nothing_and_queue_nothing(gateway_server, project, make_key, key, backend):
    def ask(raw, model, **extra):
        return httpx.post(f"{gateway_server}/gateway/v1/chat/completions", timeout=10,
                          headers={"Authorization": f"Bearer {raw}"},
                          json={"model": model, "messages": MESSAGES, "max_tokens": 5, **extra})

    # A key without the queue scope cannot reach the GPUs through the gateway either.
    r = ask(make_key(project, scopes=("budget", "ingest"))[1], MODEL)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "missing_scope")
    # A model that cannot fit on its device even drained: the queue's own refusal, its hold released.
    r = ask(key[1], "too-big")
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (
        422, "exceeds_device", "memory_mb")
    assert not QueueTask.objects.exists()
    assert set(Reservation.objects.values_list("state", flat=True)) <= {"released"}
