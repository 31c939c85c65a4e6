"""llm_judge: the verdict's parsing, then the judge end to end through our own gateway (Daphne on the
test database) to a real local OpenAI-compatible HTTP server: the score, the judge's call as a run of
its own (agent evals.llm_judge) with its cost counted, and each way it can fail as an evaluator error;
then after the run on a real worker killed mid-judge: one score, whatever is redelivered."""
from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.budgets import services as budgets
from apps.budgets.models import Reservation, SpanCost
from apps.evals import judge, runner, services, tasks
from apps.evals.evaluators import EvaluatorError
from apps.evals.models import EvalPending, EvalScore
from apps.gateway import services as gateway
from apps.traces.models import IngestBatch, Run, Span
from tests.gateway.conftest import _gateway_quiet, gateway_server, needs_postgres, upstream  # noqa: F401
from tests.traces.helpers import drain
from tests.traces.workers import purge_queue, start_worker, stop_worker, wait_for

RUBRIC = "Is the answer polite and does it answer the question asked?"
VERDICT = {"score": 0.8, "passed": True, "label": "good", "explanation": "Polite, and it answers."}


def spec(**config):
    return runner.specs_of([{"name": "llm_judge", "config": {"model": "gpt-4o", "rubric": RUBRIC, **config}}])


def judged(run, **config) -> EvalScore:
    """Evaluate ``run`` with the judge and store what came of it (as after the run or a batch does)."""
    rows = runner.evaluate([run], spec(**config), {"source": EvalScore.Source.AFTER_RUN})
    runner.store(rows)
    [score] = EvalScore.objects.filter(run=run, evaluator="llm_judge")
    return score


# --- the verdict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    json.dumps(VERDICT),
    f"Here is my verdict:\n```json\n{json.dumps(VERDICT)}\n```",
    f"Sure. {json.dumps(VERDICT)} Hope this helps.",
])
def test_a_verdict_is_read_in_a_fence_or_between_words(text):
    result = judge.parse_verdict(text, {})
    assert (result.score, result.passed, result.label, result.explanation) == (0.8, True, "good",
                                                                               "Polite, and it answers.")


def test_pass_or_fail_is_the_threshold_where_configured_else_the_judges_word_else_half():
    assert judge.parse_verdict('{"score": 0.6, "passed": true}', {"pass_threshold": 0.7}).passed is False
    assert judge.parse_verdict('{"score": 0.6, "passed": false}', {}).passed is False
    assert judge.parse_verdict('{"score": 0.6}', {}).passed is True
    assert judge.parse_verdict('{"score": 0.4}', {}).passed is False
    only_word = judge.parse_verdict('{"passed": false, "explanation": "rude"}', {})
    assert (only_word.score, only_word.passed, only_word.explanation) == (0.0, False, "rude")


@pytest.mark.parametrize("text", ["I think it is fine.", '{"score": 7}', '{"score": "high"}', '{"score": true}',
                                  '{"passed": "yes"}', '{"label": "ok"}', "[0.5]", '{"score": NaN}'])
def test_anything_else_is_unparseable(text):
    with pytest.raises(EvaluatorError) as exc:
        judge.parse_verdict(text, {})
    assert exc.value.code == "judge_unparseable"


def test_a_changed_model_rubric_or_threshold_is_a_new_version_so_earlier_verdicts_stay():
    versions = {s.version for config in ({}, {"rubric": "Is it short?"}, {"model": "gpt-4o-mini"},
                                         {"pass_threshold": 0.9}) for s in spec(**config)}
    assert len(versions) == 4
    assert spec(max_tokens=64)[0].version == spec()[0].version  # how it is asked is not what is judged


# --- without a usable key or gateway (no call is made) -------------------------------------------


@pytest.mark.django_db
def test_without_a_key_or_with_another_projects_key_the_run_gets_an_evaluator_error(record, monkeypatch,
                                                                                    other_project, make_key):
    run = record("r1")
    monkeypatch.delenv("EVALS_JUDGE_API_KEY", raising=False)
    score = judged(run)
    assert (score.outcome, score.error_code, score.score) == ("error", "judge_key_missing", None)
    assert "EVALS_JUDGE_API_KEY" in score.explanation

    monkeypatch.setenv("JUDGE_OTHER", make_key(other_project, scopes=("budget", "ingest"))[1])
    score2 = judged(record("r2"), api_key_env="JUDGE_OTHER")
    assert (score2.outcome, score2.error_code) == ("error", "judge_key_rejected")
    assert "another project" in score2.explanation


@pytest.mark.django_db
def test_an_unreachable_gateway_is_a_failed_call(record, monkeypatch, project, make_key, settings):
    monkeypatch.setenv("EVALS_JUDGE_API_KEY", make_key(project, scopes=("budget", "ingest"))[1])
    settings.EVALS_GATEWAY_URL = "http://127.0.0.1:9/gateway/v1"  # the discard port: nothing listens
    score = judged(record("r1"), timeout_seconds=2)
    assert (score.outcome, score.error_code) == ("error", "judge_call_failed")


@pytest.mark.django_db
def test_a_judges_own_run_is_never_judged_after_the_run(record, project, alice):
    services.config_create(project=project, actor=alice, name="all", evaluators=[{"name": "run_succeeded"}])
    record("gw-judge", agent=judge.JUDGE_AGENT)
    record("agent-run")
    assert list(EvalPending.objects.values_list("run__run_id", flat=True)) == ["agent-run"]


# --- through the gateway (Daphne and a fake OpenAI server; PostgreSQL) ----------------------------


@pytest.fixture
def through_gateway(gateway_server, project, make_key, upstream, monkeypatch, settings):  # noqa: F811
    """The project's upstream serves gpt-4o from the fake server; the judge's key is in the environment."""
    gateway.upstream_create(project=project, actor=None, name="primary", base_url=f"{upstream.url}/v1",
                            provider="openai", model_names=["gpt-4o"], priority=10, timeout_seconds=5)
    key, raw = make_key(project, scopes=("budget", "ingest"), name="judge")
    monkeypatch.setenv("EVALS_JUDGE_API_KEY", raw)
    settings.EVALS_GATEWAY_URL = f"{gateway_server}/gateway/v1"
    upstream.reply_text = json.dumps(VERDICT)
    return upstream


def recorded(judge_run_id: str, calls: int = 1, timeout: float = 10) -> Run:
    """The judge's run, once the gateway has recorded its calls (it does after answering) and they are
    projected."""
    deadline = time.monotonic() + timeout
    while IngestBatch.objects.filter(source="gateway").count() < calls:
        assert time.monotonic() < deadline, "the gateway recorded nothing"
        time.sleep(0.05)
    drain()
    return Run.objects.get(run_id=judge_run_id)


def settled(reservation: Reservation, timeout: float = 10) -> Reservation:
    deadline = time.monotonic() + timeout
    while (reservation := Reservation.objects.get(pk=reservation.pk)).state == "held":
        assert time.monotonic() < deadline, "still held"
        time.sleep(0.05)
    return reservation


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_the_judge_scores_through_the_gateway_and_its_call_is_traced_and_costed(record, through_gateway):
    run = record("r1", output="Hello! Paris is the capital of France.", metadata={"expected_output": "Paris"})
    score = judged(run)
    assert (score.outcome, score.score, score.passed, score.label) == ("scored", 0.8, True, "good")
    assert score.explanation == "Polite, and it answers."
    assert score.version == spec()[0].version and score.details["model"] == "gpt-4o"

    # What the model was asked: the rubric, the run's output and its reference; JSON asked for.
    [sent] = through_gateway.snapshot()
    asked = sent["json"]
    assert asked["model"] == "gpt-4o" and asked["response_format"] == {"type": "json_object"}
    user = asked["messages"][1]["content"]
    assert RUBRIC in user and "Paris is the capital of France." in user and "## Reference answer\nParis" in user
    assert "authorization" not in sent["headers"]  # the judge's key stays with the gateway

    # Its call is a run of its own, of the judge's agent, naming the run it judged; costed and charged.
    judge_run = recorded(score.details["judge_run_id"])
    assert (judge_run.agent_name, judge_run.end_user, judge_run.status) == (judge.JUDGE_AGENT, "run:r1", "completed")
    [span] = Span.objects.filter(run=judge_run)
    assert (span.kind, span.request_model, span.output_tokens) == ("llm", "gpt-4o", len(json.dumps(VERDICT).split(" ")))
    reservation = settled(Reservation.objects.get(run_id=judge_run.run_id))
    charged = reservation.charged_nanos
    assert reservation.state == "settled" and charged > 0 and judge_run.cost_usd * 10**9 == charged
    assert SpanCost.objects.get(run=judge_run).reservation_id == reservation.pk
    # The run judged is not changed by its judge.
    run.refresh_from_db()
    assert run.cost_usd is None and Span.objects.filter(run=run).count() == 0


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_an_answer_that_is_no_verdict_is_an_evaluator_error_naming_the_judges_run(record, through_gateway):
    through_gateway.reply_text = "The answer looks fine to me."
    score = judged(record("r1"))
    assert (score.outcome, score.error_code, score.score, score.passed) == ("error", "judge_unparseable", None, None)
    assert score.details["judge_run_id"].startswith("gw-")
    # A later attempt that gets a verdict takes the error over (one row, now scored).
    through_gateway.reply_text = json.dumps(VERDICT)
    again = judged(Run.objects.get(run_id="r1"))
    assert (again.pk, again.outcome, again.score, again.error_code) == (score.pk, "scored", 0.8, "")
    assert again.details["judge_run_id"] != score.details["judge_run_id"]


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_a_cap_refuses_the_judge_before_the_model_sees_anything(record, through_gateway, project, alice):
    budgets.budget_create(project=project, actor=alice, name="daily", cap_nanos=1)
    score = judged(record("r1"))
    assert (score.outcome, score.error_code) == ("error", "budget_exceeded")
    assert "daily" in score.explanation
    assert through_gateway.snapshot() == []


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_a_failing_model_is_a_failed_call_not_a_score(record, through_gateway):
    through_gateway.fail = "500"
    score = judged(record("r1"))
    assert (score.outcome, score.error_code, score.score) == ("error", "judge_call_failed", None)
    assert "502" in score.explanation


WORKER_ENV = {"EVALS_AFTER_RUN_DELAY_SECONDS": "0", "EVALS_LEASE_SECONDS": "4", "EVALS_SWEEP_SECONDS": "1",
              "EVALS_ENQUEUE_GRACE_SECONDS": "1"}


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_a_worker_killed_mid_judge_leaves_one_score_whatever_is_redelivered(
        record, through_gateway, project, alice, tmp_path, settings, gateway_server):  # noqa: F811
    settings.EVALS_AFTER_RUN_DELAY_SECONDS = 0
    services.config_create(project=project, actor=alice, name="judged", evaluators=[
        {"name": "llm_judge", "config": {"model": "gpt-4o", "rubric": RUBRIC, "timeout_seconds": 60}}])
    through_gateway.fail, through_gateway.fail_times, through_gateway.hang_seconds = "timeout", 1, 60
    env = {**WORKER_ENV, "EVALS_GATEWAY_URL": settings.EVALS_GATEWAY_URL}
    purge_queue("default")
    first = start_worker(tmp_path, "judge-a", beat=False, queues="default", env=env)
    try:
        run = record("r1")
        # The first worker is mid-judge (the model hangs): kill it there.
        wait_for(lambda: len(through_gateway.snapshot()) == 1, 60, "the judge's call", tmp_path)
        first.kill()
        first.wait(10)
        assert EvalPending.objects.get(run=run).state == "running"
        # A new worker with the beat: once the dead claim's lease expires, the sweep enqueues the run again.
        second = start_worker(tmp_path, "judge-b", beat=True, queues="default", env=env)
        try:
            wait_for(lambda: EvalPending.objects.filter(run=run, state="done").exists(), 60, "the judging", tmp_path)
            for _ in range(3):  # redelivered, duplicated
                tasks.after_run.delay(run.pk)
            quiet_until = timezone.now() + timedelta(seconds=3)
            wait_for(lambda: timezone.now() > quiet_until, 10, "the duplicates to be consumed", tmp_path)
        finally:
            stop_worker(second)
    finally:
        stop_worker(first)
    [score] = EvalScore.objects.filter(run=run)
    assert (score.evaluator, score.outcome, score.score, score.source) == ("llm_judge", "scored", 0.8, "after_run")
    pending = EvalPending.objects.get(run=run)
    assert (pending.state, pending.generation) == ("done", 2)
    assert len(through_gateway.snapshot()) == 2  # the killed call and the one that scored: no more
