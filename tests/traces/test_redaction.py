"""REST writes: personal data and secrets never reach Run / Span / ToolCall, and raw batches go."""
from __future__ import annotations

import json

import pytest

from apps.projects import services as project_services
from apps.traces.models import IngestBatch

from .helpers import at, drain
from .store_scan import stored_text

pytestmark = pytest.mark.django_db

EMAIL, CARD, KEY = "jane.doe@example.com", "4111 1111 1111 1111", "sk-proj-Zx81KqPpL2mN4vB7cX9dE3fG"
SECRETS = (EMAIL, CARD, KEY, "4111111111111111", "203.0.113.7")


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project)[1])


def post(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def _send_run(agent) -> None:
    assert post(agent, "/api/v1/runs", {
        "run_id": "r-pii", "agent": "billing-bot", "end_user": "u-1",
        "input": {"question": f"I am {EMAIL}, charge card {CARD}"},
        "metadata": {"client_ip": "203.0.113.7", "ticket": "EMP-004211"},
    }).status_code == 202
    assert post(agent, "/api/v1/runs/r-pii/spans", [
        {"span_id": "llm-1", "kind": "llm", "name": "chat", "model": "gpt-4o", "start_time": at(1), "end_time": at(2),
         "input_messages": [{"role": "user", "content": f"email {EMAIL} card {CARD}"}],
         "output_messages": [{"role": "assistant", "content": f"Using key {KEY}"}],
         "attributes": {"http.client_ip": "203.0.113.7", "note": f"from {EMAIL}"}},
        {"span_id": "tool-1", "kind": "tool", "parent_span_id": "llm-1", "start_time": at(2), "end_time": at(3),
         "tool": {"name": "charge", "arguments": {"card": CARD, "receipt_to": EMAIL, "api_key": KEY},
                  "result": {"ok": True, "echo": EMAIL}},
         "events": [{"name": "log", "time": at(2), "attributes": {"message": f"charging {CARD} for {EMAIL}"}}]},
    ]).status_code == 202
    assert post(agent, "/api/v1/runs/r-pii/finish", {"output": f"Receipt sent to {EMAIL}"}).status_code == 202
    drain()


def test_rest_writes_store_placeholders_not_the_data(project, agent):
    _send_run(agent)
    text = stored_text(project)
    for secret in SECRETS:
        assert secret not in text
    assert "[EMAIL]" in text and "[CARD]" in text and "[API_KEY]" in text and "[IP]" in text
    assert not IngestBatch.objects.filter(project=project).exclude(payload=None).exists()

    run = agent.get("/api/v1/runs/r-pii").json()
    assert run["input"] == {"question": "I am [EMAIL], charge card [CARD]"}
    assert run["output"] == "Receipt sent to [EMAIL]"
    spans = {s["span_id"]: s for s in run["spans"]}
    assert spans["tool-1"]["tool"]["arguments"] == {"card": "[CARD]", "receipt_to": "[EMAIL]", "api_key": "[API_KEY]"}
    assert spans["llm-1"]["model"] == "gpt-4o"
    assert run["end_user"] == "u-1"


def test_project_settings_exempt_add_and_switch_off(project, alice, agent):
    project_services.project_update(project=project, actor=alice,
                                    redaction_patterns=[{"name": "EMPLOYEE_ID", "pattern": r"EMP-\d{6}"}],
                                    redaction_exempt_attributes=["http.client_ip", "client_ip"])
    _send_run(agent)
    run = agent.get("/api/v1/runs/r-pii").json()
    assert run["metadata"] == {"client_ip": "203.0.113.7", "ticket": "[EMPLOYEE_ID]"}
    llm = next(s for s in run["spans"] if s["span_id"] == "llm-1")
    assert llm["attributes"] == {"http.client_ip": "203.0.113.7", "note": "from [EMAIL]"}

    project_services.project_update(project=project, actor=alice, redaction_enabled=False, redaction_patterns=[])
    assert post(agent, "/api/v1/runs", {"run_id": "r-raw", "input": f"to {EMAIL}"}).status_code == 202
    drain()
    assert agent.get("/api/v1/runs/r-raw").json()["input"] == f"to {EMAIL}"
