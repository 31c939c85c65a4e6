"""`make demo` fills a project through the REST API with every case the run log must show."""
from __future__ import annotations

import pytest
from django.core.management import call_command

from apps.audit.models import AuditEvent
from apps.projects.models import ApiKey
from apps.traces.models import IngestBatch, Run

pytestmark = pytest.mark.django_db


def test_demo_traffic_covers_the_cases_and_reads_back_through_the_api(key_client):
    call_command("demo", runs=8)
    # It went through the REST path: one durable batch per HTTP request, each hashed from its method,
    # path and body by the API view, sent with the key the demo minted; all projected.
    key = ApiKey.objects.get(name="demo traffic")
    batches = IngestBatch.objects.all()
    assert batches.count() > 30 and all(b.source == "rest" and len(b.request_hash) == 64 and b.api_key_id == key.pk
                                        for b in batches)
    assert not batches.exclude(status="done").exists()
    # The key it minted is audited and does not outlive the demo.
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.filter(action="api_key.created", object_id=str(key.pk)).exists()
    assert AuditEvent.objects.filter(action="api_key.revoked", object_id=str(key.pk)).exists()

    runs = Run.objects.filter(project__slug="demo")
    assert {r.agent_name for r in runs} == {"support-bot", "research-agent", "web-searcher", "coder"}
    assert len({r.end_user for r in runs}) >= 4 and len({r.session_id for r in runs}) >= 4
    assert sum(r.cache_read_tokens for r in runs) > 0 and sum(r.cache_write_tokens for r in runs) > 0
    assert sum(r.reasoning_tokens for r in runs) > 0

    # Read it back the way a user would (a read key of the project).
    from apps.projects import services
    client = key_client(services.api_key_create(project=key.project, name="reader", scopes=["read"], actor=None)[1])
    details = {r.run_id: client.get(f"/api/v1/runs/{r.run_id}").json() for r in runs}
    spans = [s for d in details.values() for s in d["spans"]]
    assert any(s.get("recovers", {}).get("via") == "retry" and s["kind"] == "tool" and s["status"] == "ok"
               for s in spans), "a retry after a failed tool call"
    by_id = {s["span_id"]: s for s in spans}
    assert any(s.get("recovers", {}).get("via") == "fallback" and s["status"] == "ok"
               and s["model"] != by_id[s["fallback_of"]]["model"] and by_id[s["fallback_of"]]["status"] == "error"
               for s in spans), "a fallback to another model"
    failed = [d for d in details.values() if d["status"] == "failed"]
    assert failed and all(d["failing_span_id"] and d["error_code"] for d in failed)
    child = next(d for d in details.values() if d["agent"]["name"] == "web-searcher" and d["status"] == "failed")
    assert child["parent_run_id"] and child["failing_span_id"].endswith("-search-s2")
    (open_run,) = [d for d in details.values() if d["status"] == "running"]
    assert open_run["agent"]["name"] == "coder" and any(s["end_time"] is None for s in open_run["spans"])
    assert all(t["status"] in ("ok", "error") for d in details.values() for t in d["tool_calls"])
