"""One admission path for every door: REST writes answer 429 past a key's rate and 503 past the backlog
mark, with Retry-After, exactly as OTLP does; the backlog is one shared count, so records accepted at
one door hold back the others, and the overshoot past the high mark is one request's records at most
when requests come one at a time (at most the records of the requests in flight at once otherwise)."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from apps.traces import admission
from apps.traces.models import IngestBatch
from tests.ingest import builders as b

from .helpers import drain

pytestmark = pytest.mark.django_db


def _spans(n: int, prefix: str = "s") -> str:
    return json.dumps([{"span_id": f"{prefix}-{i}", "kind": "llm", "model": "m"} for i in range(n)])


def test_a_rest_key_over_its_rate_gets_429_with_retry_after_like_otlp(project, make_key, key_client, monkeypatch):
    # The rate counts fixed one-minute windows: hold the clock mid-window, or 31 requests that straddle
    # a minute's end are two windows' worth and the last one is (rightly) let through.
    now = (time.time() // 60) * 60 + 30
    monkeypatch.setattr(admission, "time", SimpleNamespace(time=lambda: now))
    key, raw = make_key(project, scopes=["ingest"])
    key.rate_limit_per_minute = 30
    key.save(update_fields=["rate_limit_per_minute"])
    agent = key_client(raw)
    codes = [agent.post("/api/v1/runs", data=json.dumps({"run_id": f"r{i}"}), content_type="application/json")
             .status_code for i in range(31)]
    assert codes[:30] == [202] * 30 and codes[30] == 429
    r = agent.post("/api/v1/runs/r1/spans", data=_spans(1), content_type="application/json")
    assert r.status_code == 429 and r.json()["error_code"] == "rate_limited" and 1 <= int(r["Retry-After"]) <= 61
    assert IngestBatch.objects.count() == 30
    # The OTLP door counts against the same key's rate.
    otlp = agent.post("/v1/traces", data=b.request(b.span(b.trace_id())).SerializeToString(),
                      content_type="application/x-protobuf")
    assert otlp.status_code == 429


def test_rest_sheds_with_503_past_the_backlog_mark_and_the_overshoot_is_one_request(project, make_key, key_client,
                                                                                    settings):
    settings.INGEST_BACKLOG_HIGH, settings.INGEST_BACKLOG_LOW = 100, 50
    agent = key_client(make_key(project, scopes=["ingest"])[1])
    answers = [agent.post("/api/v1/runs/r1/spans", data=_spans(60, f"b{i}"), content_type="application/json")
               for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 503]
    shed = answers[2]
    assert shed.json()["error_code"] == "service_unavailable" and int(shed["Retry-After"]) > 0
    waiting = sum(IngestBatch.objects.values_list("item_count", flat=True))
    assert waiting == 120 and waiting - settings.INGEST_BACKLOG_HIGH < 60  # past the mark by under one request
    drain()  # projected: the backlog falls under the low mark and writes are admitted again
    assert agent.post("/api/v1/runs/r1/spans", data=_spans(1, "after"), content_type="application/json"
                      ).status_code == 202


def test_otlp_records_count_toward_the_backlog_rest_sees(project, make_key, key_client, settings):
    settings.INGEST_BACKLOG_HIGH, settings.INGEST_BACKLOG_LOW = 3, 1
    agent = key_client(make_key(project, scopes=["ingest"])[1])
    tid = b.trace_id()
    req: ExportTraceServiceRequest = b.request(*[b.span(tid) for _ in range(3)])
    assert agent.post("/v1/traces", data=req.SerializeToString(), content_type="application/x-protobuf"
                      ).status_code == 200
    assert agent.post("/api/v1/runs", data=json.dumps({"run_id": "r"}), content_type="application/json"
                      ).status_code == 503


def test_a_lost_count_is_corrected_by_the_sweeper(project, make_key, key_client, settings):
    settings.INGEST_BACKLOG_HIGH, settings.INGEST_BACKLOG_LOW = 10, 5
    agent = key_client(make_key(project, scopes=["ingest"])[1])
    assert agent.post("/api/v1/runs/r1/spans", data=_spans(8), content_type="application/json").status_code == 202
    admission.backlog_add(+1000)  # a drifted counter (say, a crash between a commit and its decrement)
    assert agent.post("/api/v1/runs", data=json.dumps({}), content_type="application/json").status_code == 503
    from apps.traces import services
    services.inbox_sweep()  # projects the 8 and resets the count to the inbox's true figure (0)
    assert agent.post("/api/v1/runs", data=json.dumps({}), content_type="application/json").status_code == 202
