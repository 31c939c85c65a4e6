"""Each built-in evaluator on crafted traces (recorded through the run log as an agent would send them),
the registry's checks of settings, and the runner's promises: an evaluator's error is a visible row
that never stops the others, and storing again adds and changes nothing."""
from __future__ import annotations

import pytest

from apps.evals import evaluators, runner
from apps.evals.evaluators import Evaluator, EvaluatorError, Result
from apps.evals.models import EvalScore
from tests.traces.helpers import at

pytestmark = pytest.mark.django_db


def judge(run, name: str, config: dict | None = None) -> dict | None:
    """The row an evaluator produces for a run (None: it does not apply)."""
    rows = runner.evaluate([run], [runner.Spec(evaluators.get(name), config or {})], {"source": "job"})
    assert len(rows) <= 1
    return rows[0] if rows else None


def tool(span_id: str, name: str, *, ok: bool, start: float = 1, **kw) -> dict:
    return {"span_id": span_id, "kind": "tool", "name": name, "tool": {"name": name}, "start_time": at(start),
            "end_time": at(start + 1), "status": "ok" if ok else "error",
            **({} if ok else {"status_message": f"{name} timed out"}), **kw}


def llm(span_id: str, *, start: float = 2, finish_reason: str = "stop", text: str = "Done.", **kw) -> dict:
    return {"span_id": span_id, "kind": "llm", "model": "gpt-4o", "provider": "openai", "start_time": at(start),
            "end_time": at(start + 1), "status": "ok",
            "output_messages": [{"role": "assistant", "content": text, "finish_reason": finish_reason}], **kw}


def test_run_succeeded(record):
    assert judge(record("ok"), "run_succeeded")["passed"] is True
    failed = judge(record("bad", status="failed", error_code="upstream_down"), "run_succeeded")
    assert (failed["passed"], failed["score"], failed["label"]) == (False, 0.0, "failed")
    assert "upstream_down" in failed["explanation"]
    assert judge(record("open", finish_run=False), "run_succeeded") is None


def test_silent_success_catches_a_completed_run_whose_tool_failed(record):
    run = record("silent", spans=[tool("t1", "lookup_order", ok=False), llm("c1")])
    assert run.status == "completed"
    row = judge(run, "silent_success")
    assert (row["passed"], row["score"], row["label"]) == (False, 0.0, "tool_failed")
    assert "lookup_order failed" in row["explanation"] and "timed out" in row["explanation"]
    # The same run, judged by whether it succeeded, looks green: that is the point.
    assert judge(run, "run_succeeded")["passed"] is True


def test_silent_success_passes_a_clean_run_and_a_recovered_retry(record):
    assert judge(record("clean", spans=[tool("t1", "lookup", ok=True), llm("c1")]), "silent_success")["passed"]
    recovered = record("retried", spans=[tool("t1", "lookup", ok=False), tool("t2", "lookup", ok=True, start=1.5,
                                                                                 retry_of="t1"), llm("c1")])
    row = judge(recovered, "silent_success")
    assert row["passed"] is True, row


@pytest.mark.parametrize(("case", "kw", "label"), [
    ("error span", {"spans": [{"span_id": "s1", "kind": "retriever", "name": "search", "start_time": at(1),
                               "end_time": at(2), "status": "error"}, llm("c1")]}, "error_span"),
    ("empty output", {"output": "", "spans": [llm("c1")]}, "empty_output"),
    ("no output", {"output": None, "spans": [llm("c1")]}, "empty_output"),
    ("truncated", {"spans": [llm("c1", finish_reason="length")]}, "truncated"),
    ("refusal text", {"output": "I'm sorry, but I can't help with that.", "spans": [llm("c1")]}, "refusal"),
    ("content filter", {"spans": [llm("c1", finish_reason="content_filter")]}, "refusal"),
])
def test_silent_success_catches_each_kind(record, case, kw, label):
    row = judge(record(case.replace(" ", "-"), **kw), "silent_success")
    assert (row["passed"], row["label"]) == (False, label), row


def test_silent_success_catches_a_loop_whose_winner_failed_its_verdict(record):
    loop = {"span_id": "loop", "kind": "loop", "name": "best-of-2", "start_time": at(1), "end_time": at(9),
            "details": {"loop": {"winner_index": 1}}}
    iterations = [{"span_id": f"it{i}", "parent_span_id": "loop", "kind": "loop.iteration", "name": f"try {i}",
                   "start_time": at(1 + i), "end_time": at(2 + i),
                   "details": {"loop": {"index": i, "verdict": {"valid": i == 0}}}} for i in range(2)]
    run = record("loop-bad", spans=[loop, *iterations])
    row = judge(run, "silent_success")
    assert (row["passed"], row["label"]) == (False, "loop_winner_invalid"), row
    loop_ok = {**loop, "details": {"loop": {"winner_index": 0}}}
    assert judge(record("loop-ok", spans=[loop_ok, *iterations]), "silent_success")["passed"] is True


def test_silent_success_leaves_failures_that_say_so_alone(record):
    assert judge(record("loud", status="failed", spans=[tool("t1", "x", ok=False)]), "silent_success") is None


def test_latency_and_cost_slos_with_per_agent_thresholds(record):
    run = record("slow", spans=[llm("c1", cost_usd="0.020000000")], agent="planner")  # 60 s long
    assert run.duration_ms == 60_000
    assert judge(run, "latency_slo", {"max_ms": 90_000})["passed"] is True
    row = judge(run, "latency_slo", {"max_ms": 90_000, "per_agent": {"planner": 30_000}})
    assert (row["passed"], row["label"], row["score"]) == (False, "over", 60_000)
    assert judge(run, "cost_slo", {"max_usd": "0.05"})["passed"] is True
    assert judge(run, "cost_slo", {"max_usd": "0.05", "per_agent": {"planner": "0.01"}})["passed"] is False
    unpriced = judge(record("free"), "cost_slo", {"max_usd": 1})
    assert (unpriced["passed"], unpriced["label"]) == (None, "unpriced")


def test_tool_error_rate(record):
    run = record("tools", spans=[tool("a", "x", ok=True), tool("b", "y", ok=False, start=2),
                                 tool("c", "z", ok=True, start=3), tool("d", "z", ok=True, start=4)])
    row = judge(run, "tool_error_rate")
    assert (row["score"], row["passed"], row["label"]) == (0.25, False, "1/4 failed")
    assert judge(run, "tool_error_rate", {"max_rate": 0.3})["passed"] is True
    assert judge(record("no-tools"), "tool_error_rate") is None


def test_json_valid_with_and_without_a_schema(record):
    schema = {"type": "object", "required": ["order"], "properties": {"order": {"type": "string"}}}
    assert judge(record("j1", output='{"order": "A-17"}'), "json_valid", {"schema": schema})["passed"] is True
    assert judge(record("j2", output={"order": "A-17"}), "json_valid", {"schema": schema})["passed"] is True
    bad = judge(record("j3", output='{"order": 17}'), "json_valid", {"schema": schema})
    assert (bad["passed"], bad["label"]) == (False, "schema_mismatch") and "order" in bad["explanation"]
    assert judge(record("j4", output="not json {"), "json_valid")["label"] == "invalid_json"
    assert judge(record("j5", output='{"order": 17}'), "json_valid")["passed"] is True


def test_contains_and_regex_on_the_final_output(record):
    run = record("text", output={"role": "assistant", "content": "Your refund of EUR 120 is on its way."})
    assert judge(run, "contains", {"text": "refund"})["passed"] is True
    assert judge(run, "contains", {"text": "REFUND", "case_sensitive": True})["passed"] is False
    assert judge(run, "contains", {"text": "password", "negate": True})["passed"] is True
    assert judge(run, "regex", {"pattern": r"EUR \d+"})["passed"] is True
    assert judge(run, "regex", {"pattern": r"usd", "ignore_case": True})["passed"] is False


def test_expected_output_against_the_reference_attached_to_the_run(record):
    ref = {"expected_output": "The answer is 42."}
    assert judge(record("e1", output="the answer is  42", metadata=ref), "expected_output")["passed"] is True
    assert judge(record("e2", output="the answer is 42", metadata=ref), "expected_output",
                 {"mode": "exact"})["passed"] is False
    miss = judge(record("e3", output="It is 41.", metadata=ref), "expected_output")
    assert miss["passed"] is False and "42" in miss["explanation"]
    assert judge(record("e4", output='{"b": 2, "a": 1}', metadata={"expected_output": {"a": 1, "b": 2}}),
                 "expected_output")["passed"] is True
    assert judge(record("e5", output="x"), "expected_output") is None  # no reference: not applicable
    assert judge(record("e6", output="x"), "expected_output", {"expected": "x"})["passed"] is True


def test_settings_are_checked_against_each_evaluator_s_schema():
    assert evaluators.specs_errors([{"name": "silent_success"}, {"name": "latency_slo", "config": {"max_ms": 5}}]) == []
    problems = evaluators.specs_errors([{"name": "nope"}, {"name": "latency_slo"},
                                        {"name": "regex", "config": {"pattern": "("}},
                                        {"name": "contains", "config": {"text": "a", "extra": 1}},
                                        {"name": "json_valid", "config": {"schema": {"type": "wrong"}}}])
    assert len(problems) == 5, problems
    assert "no evaluator is called 'nope'" in problems[0]
    assert "max_ms" in problems[1] and "does not compile" in problems[2] and "extra" in problems[3]
    assert evaluators.specs_errors([]) and evaluators.specs_errors("x")


class _Boom(Evaluator):
    name = "test_boom"

    def evaluate(self, facts, config):
        if facts.run.run_id == "judge-fails":
            raise EvaluatorError("judge_unparseable", "The judge answered nothing parseable.")
        raise RuntimeError("a bug")


@pytest.fixture
def boom():
    evaluators.register(_Boom)
    yield evaluators.get("test_boom")
    evaluators.REGISTRY.pop("test_boom")


def test_an_evaluator_error_is_a_visible_row_and_the_others_still_score(record, boom):
    runs = [record("judge-fails"), record("crashes")]
    specs = [runner.Spec(boom, {}), runner.Spec(evaluators.get("run_succeeded"), {})]
    rows = runner.evaluate(runs, specs, {"source": "job"})
    runner.store(rows)
    errors = {s.run.run_id: s for s in EvalScore.objects.filter(outcome="error").select_related("run")}
    assert errors["judge-fails"].error_code == "judge_unparseable"
    assert errors["crashes"].error_code == "evaluator_crashed" and "a bug" in errors["crashes"].explanation
    assert errors["crashes"].score is None and errors["crashes"].passed is None
    assert EvalScore.objects.filter(evaluator="run_succeeded", outcome="scored").count() == 2


def test_storing_again_adds_and_changes_nothing_but_an_error_is_taken_over(record, boom):
    run = record("twice")
    spec = runner.Spec(evaluators.get("run_succeeded"), {})
    runner.store(runner.evaluate([run], [spec], {"source": "job"}))
    first = list(EvalScore.objects.values())
    runner.store(runner.evaluate([run], [spec], {"source": "after_run"}))
    assert list(EvalScore.objects.values()) == first
    # An error held for an evaluator's version: a later success takes the row over (visibly: outcome).
    runner.store([{**runner._error_row(run, runner.Spec(boom, {}), {"source": "job"}, "judge_failed", "x")}])

    class _Fine(_Boom):
        def evaluate(self, facts, config):
            return Result(score=0.5, passed=True, label="fine")

    runner.store(runner.evaluate([run], [runner.Spec(_Fine(), {})], {"source": "job"}))
    row = EvalScore.objects.get(evaluator="test_boom")
    assert (row.outcome, row.score, row.label, row.error_code) == ("scored", 0.5, "fine", "")
    # ... once: a success held is never replaced.
    runner.store([{**runner._error_row(run, runner.Spec(boom, {}), {"source": "job"}, "judge_failed", "x")}])
    assert EvalScore.objects.get(evaluator="test_boom").outcome == "scored"
