"""One bad record never costs the good ones, over REST: each poison that once answered 202 and then
took its batch down in the worker (or answered 500) is now refused at the door, whole, with a 400
naming the field; nothing is stored half, and the 50 good spans sent again without it are all stored."""
from __future__ import annotations

import json

import pytest

from apps.traces.models import IngestBatch, Span

from .helpers import drain

pytestmark = pytest.mark.django_db

GOOD = 50


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project, scopes=["ingest", "read"])[1])


def _nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _good() -> list[dict]:
    return [{"span_id": f"good-{i}", "kind": "llm", "model": "gpt-4o",
             "usage": {"input_tokens": 10, "output_tokens": 2}} for i in range(GOOD)]


@pytest.mark.parametrize(("poison", "field"), [
    ({"span_id": "bad", "usage": {"input_tokens": 2**63}}, f"spans[{GOOD}].usage.input_tokens"),
    ({"span_id": "bad", "input_messages": _nested(900)}, f"spans[{GOOD}].input_messages"),
    ({"span_id": "bad", "name": "half \udfff"}, f"spans[{GOOD}].name"),
    ({"span_id": "bad", "name": "nul \x00"}, f"spans[{GOOD}].name"),
    ({"span_id": "bad", "attributes": {"k": "nul \x00"}}, f"spans[{GOOD}].attributes"),
])
def test_a_poisoned_span_beside_fifty_good_ones_is_refused_whole_and_the_good_ones_store(agent, poison, field):
    r = agent.post("/api/v1/runs/r1/spans", data=json.dumps([*_good(), poison]), content_type="application/json")
    assert r.status_code == 400, r.content
    assert r.json()["error_code"] == "invalid_request" and r.json()["details"]["field"] == field
    assert not IngestBatch.objects.exists()

    assert agent.post("/api/v1/runs/r1/spans", data=json.dumps(_good()), content_type="application/json"
                      ).status_code == 202
    drain()
    assert Span.objects.filter(run__run_id="r1").count() == GOOD
    assert not IngestBatch.objects.filter(status="dead").exists()


WRITES = [("post", "/api/v1/runs", lambda v: {"input": v}),
          ("post", "/api/v1/runs/r1/spans", lambda v: [*_good(), {"details": v}]),
          ("patch", "/api/v1/runs/r1/spans/s1", lambda v: {"details": v}),
          ("post", "/api/v1/runs/r1/finish", lambda v: {"output": v})]


@pytest.mark.parametrize(("method", "url", "body"), WRITES)
@pytest.mark.parametrize("number", ["1e400", "-1e999"])
def test_a_number_past_a_double_is_a_parse_error_on_every_write(agent, method, url, body, number):
    raw = json.dumps(body("@")).replace('"@"', number)
    r = getattr(agent, method)(url, data=raw, content_type="application/json")
    assert r.status_code == 400 and r.json()["error_code"] == "parse_error", r.content
    assert "out of range" in r.json()["message"]
    assert not IngestBatch.objects.exists()


@pytest.mark.parametrize(("method", "url", "body"), WRITES)
def test_a_lone_low_surrogate_is_refused_on_every_write(agent, method, url, body):
    r = getattr(agent, method)(url, data=json.dumps(body({"text": "\udfff"})), content_type="application/json")
    assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", r.content
    assert "surrogate" in r.json()["message"]
    assert not IngestBatch.objects.exists()
