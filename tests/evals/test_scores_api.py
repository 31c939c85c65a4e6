"""Scores over HTTP: a run's scores, external scores (keys), people's feedback (roles that score), the
after-run configurations (project admins; audited), the registry; and the trace's own evaluation
events (the real OpenTelemetry SDK) stored as scores."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

from apps.audit.models import AuditEvent
from apps.evals.models import EvalScore
from tests.ingest.otel import RecordingExporter, flush, sdk
from tests.traces.helpers import drain


@pytest.fixture
def run(record):
    return record("r1")


SCORE = {"evaluator": "ragas.faithfulness", "version": "0.2", "score": 0.82, "label": "faithful",
         "explanation": "3 of 4 claims supported"}


@pytest.mark.django_db
def test_an_external_score_is_stored_once_and_never_replaced(run, agent_key, key_client):
    agent = key_client(agent_key[1])
    first = agent.post("/api/v1/runs/r1/scores", SCORE, format="json")
    assert first.status_code == 201, first.content
    body = first.json()
    assert (body["evaluator"], body["version"], body["score"], body["source"], body["span_id"]) == (
        "ragas.faithfulness", "0.2", 0.82, "api", None)
    again = agent.post("/api/v1/runs/r1/scores", SCORE, format="json")
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    other = agent.post("/api/v1/runs/r1/scores", {**SCORE, "score": 0.1}, format="json")
    assert other.status_code == 409 and other.json()["error_code"] == "score_exists"
    assert agent.post("/api/v1/runs/r1/scores", {**SCORE, "version": "0.3", "score": 0.1},
                      format="json").status_code == 201
    assert EvalScore.objects.filter(run=run).count() == 2
    assert EvalScore.objects.get(version="0.2").api_key_id == agent_key[0].pk


@pytest.mark.django_db
@pytest.mark.parametrize(("body", "field"), [
    ({"evaluator": "x"}, "score"),
    ({"evaluator": "human", "score": 1}, "evaluator"),
    ({"evaluator": "has space", "score": 1}, "evaluator"),
    ({"evaluator": "x", "score": "high"}, "score"),
    ({"evaluator": "x", "score": 1, "label": "a\x00b"}, "label"),
])
def test_bad_scores_are_refused_with_the_field_named(run, agent_key, key_client, body, field):
    resp = key_client(agent_key[1]).post("/api/v1/runs/r1/scores", body, format="json")
    assert resp.status_code == 400 and resp.json()["error_code"] == "invalid_request", resp.content
    assert field in resp.json()["details"]["fields"]
    assert not EvalScore.objects.exists()


@pytest.mark.django_db
def test_a_score_for_another_project_s_run_is_not_found(run, other_project, make_key, key_client, client_for, alice):
    _, raw = make_key(other_project, scopes=("ingest", "read"))
    assert key_client(raw).post("/api/v1/runs/r1/scores", SCORE, format="json").status_code == 404
    person = client_for(alice).post("/api/v1/runs/r1/scores", SCORE, format="json")
    assert person.status_code == 403 and person.json()["error_code"] == "api_key_required"


@pytest.mark.django_db
def test_feedback_is_one_per_person_theirs_to_change_and_attributed(run, dave, bob, alice, client_for, agent_key,
                                                                    key_client):
    down = client_for(dave).post("/api/v1/runs/r1/feedback", {"passed": False, "comment": "Wrong order number"},
                                 format="json")
    assert down.status_code == 200, down.content
    assert (down.json()["evaluator"], down.json()["label"], down.json()["user"], down.json()["source"]) == (
        "human", "down", "dave", "human")
    up = client_for(dave).post("/api/v1/runs/r1/feedback", {"passed": True}, format="json")
    assert up.json()["id"] == down.json()["id"] and up.json()["label"] == "up"
    client_for(alice).post("/api/v1/runs/r1/feedback", {"score": 4}, format="json")
    rows = {s.user.username: (s.score, s.passed) for s in EvalScore.objects.filter(evaluator="human")}
    assert rows == {"dave": (1.0, True), "alice": (4.0, None)}
    # An auditor changes nothing; a key is never a person; an empty feedback says what it lacks.
    assert client_for(bob).post("/api/v1/runs/r1/feedback", {"passed": True}, format="json").status_code == 403
    key = key_client(agent_key[1]).post("/api/v1/runs/r1/feedback", {"passed": True}, format="json")
    assert key.status_code == 403 and key.json()["error_code"] == "person_only"
    assert client_for(dave).post("/api/v1/runs/r1/feedback", {"comment": "hm"}, format="json").status_code == 400


@pytest.mark.django_db
def test_a_run_s_scores_list_every_source(run, agent_key, key_client, dave, client_for, bob):
    key_client(agent_key[1]).post("/api/v1/runs/r1/scores", SCORE, format="json")
    client_for(dave).post("/api/v1/runs/r1/feedback", {"passed": True}, format="json")
    listed = client_for(bob).get("/api/v1/runs/r1/scores")
    assert listed.status_code == 200
    assert {(s["evaluator"], s["source"]) for s in listed.json()} == {("ragas.faithfulness", "api"),
                                                                       ("human", "human")}


@pytest.mark.django_db
def test_configurations_are_for_project_admins_checked_and_audited(project, alice, bob, client_for):
    url = "/api/v1/projects/acme/eval-configs"
    bad = client_for(alice).post(url, {"name": "q", "evaluators": [{"name": "latency_slo"}]}, format="json")
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "evaluators", bad.content
    assert "max_ms" in bad.json()["message"]
    ok = client_for(alice).post(url, {"name": "q", "evaluators": [{"name": "latency_slo", "config": {"max_ms": 900}}],
                                      "agent_pattern": "support-*", "sample_rate": 0.25}, format="json")
    assert ok.status_code == 201, ok.content
    assert AuditEvent.objects.filter(action="evals.config_created", project_id=project.pk).exists()
    assert client_for(bob).post(url, {"name": "b", "evaluators": [{"name": "run_succeeded"}]},
                                format="json").status_code == 403
    detail = f"{url}/{ok.json()['id']}"
    assert client_for(alice).patch(detail, {"sample_rate": 2}, format="json").status_code == 400
    assert client_for(alice).patch(detail, {"enabled": False}, format="json").json()["enabled"] is False
    assert AuditEvent.objects.filter(action="evals.config_updated").count() == 1
    assert client_for(bob).get(url).json()[0]["name"] == "q"


@pytest.mark.django_db
def test_the_registry_lists_the_built_ins(client_for, alice):
    names = {e["name"] for e in client_for(alice).get("/api/v1/evaluators").json()}
    assert {"run_succeeded", "silent_success", "latency_slo", "cost_slo", "tool_error_rate", "json_valid",
            "contains", "regex", "expected_output"} <= names


@pytest.mark.django_db(transaction=True)
def test_evaluation_events_in_a_trace_become_scores_once(live_server, project, make_key):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _, raw = make_key(project, scopes=("ingest", "read"))
    provider, tracer, exporter = sdk(live_server.url, raw)
    kept = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    with tracer.start_as_current_span("invoke_agent bot", attributes={"gen_ai.agent.name": "bot"}) as root:
        trace_id = root.get_span_context().trace_id
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}) as chat:
            chat_id = chat.get_span_context().span_id
            chat.add_event("gen_ai.evaluation.result", {
                "gen_ai.evaluation.name": "Relevance", "gen_ai.evaluation.score.value": 0.9,
                "gen_ai.evaluation.score.label": "pass", "gen_ai.evaluation.explanation": "on topic"})
            chat.add_event("gen_ai.evaluation.result", {
                "gen_ai.evaluation.name": "Toxicity", "gen_ai.evaluation.score.label": "fail"})
    flush(provider, exporter)
    drain()
    # The same spans exported again (an SDK's retry): stored once.
    again = RecordingExporter(endpoint=f"{live_server.url}/v1/traces", headers={"Authorization": f"Bearer {raw}"})
    assert again.export(kept.get_finished_spans()) is SpanExportResult.SUCCESS
    drain()
    rows = {s.evaluator: s for s in EvalScore.objects.select_related("run")}
    assert set(rows) == {"Relevance", "Toxicity"} and EvalScore.objects.count() == 2
    rel = rows["Relevance"]
    assert (rel.score, rel.label, rel.passed, rel.explanation, rel.source, rel.version) == (
        0.9, "pass", True, "on topic", "trace", "trace")
    assert rel.span_id == f"{chat_id:016x}" and rel.run.trace_id == f"{trace_id:032x}"
    assert (rows["Toxicity"].score, rows["Toxicity"].passed) == (None, False)


@pytest.mark.django_db
def test_evaluations_of_any_shape_never_fail_the_projection(record):
    """A REST producer's details are any JSON: only well-formed evaluations become scores."""
    base = {"kind": "llm", "name": "x"}
    run = record("shapes", spans=[
        {**base, "span_id": "a", "details": ["not", "an", "object"]},
        {**base, "span_id": "b", "details": {"evaluations": "nope"}},
        {**base, "span_id": "c", "details": {"evaluations": [1, None, {"name": "q", "score": "high"},
                                                             {"name": "big", "score": 10**400},
                                                             {"name": "ok", "score": 3, "label": "good"}]}}])
    assert run.span_count == 3
    assert [(s.evaluator, s.score, s.passed) for s in EvalScore.objects.filter(run=run)] == [("ok", 3.0, True)]
