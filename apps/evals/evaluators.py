"""The evaluator registry: a class per evaluator (name, version, a JSON Schema for its settings), each
judging one run from what was recorded (``facts.RunFacts``), never by calling the agent again.

An evaluator returns a ``Result`` (a score and/or a label and pass/fail, with an explanation), ``None``
where it does not apply (no tool calls to rate, no reference to compare with: nothing is stored), or
raises ``EvaluatorError`` (stored as an evaluator error on the run, never a crash of the batch). A
change to what an evaluator concludes bumps its ``version``: the old scores stay, the new ones are
added beside them.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

if TYPE_CHECKING:
    from .facts import RunFacts


@dataclass
class Result:
    score: float | None = None
    passed: bool | None = None
    label: str = ""
    explanation: str = ""
    span_id: str = ""
    details: dict = field(default_factory=dict)  # what else the score keeps (a judge's run and model)


class EvaluatorError(Exception):
    """An evaluator could not judge the run (bad output of a judge, a refused budget, ...)."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class Evaluator:
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    config_schema: ClassVar[dict] = {"type": "object", "additionalProperties": False}
    # What it reads beyond the run row (``facts``): "errors", "tools", "last_llm", "loops".
    needs: ClassVar[frozenset[str]] = frozenset()
    # Whether it judges from the stored data alone (no model call): the batch's fast path.
    deterministic: ClassVar[bool] = True

    def version_of(self, config: dict) -> str:
        """The version its scores are stored under with these settings (a judge's rubric is part of it)."""
        return self.version

    def evaluate(self, facts: RunFacts, config: dict) -> Result | None:  # pragma: no cover - abstract
        raise NotImplementedError


REGISTRY: dict[str, Evaluator] = {}


def register(cls: type[Evaluator]) -> type[Evaluator]:
    Draft202012Validator.check_schema(cls.config_schema)
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Evaluator | None:
    return REGISTRY.get(name)


def specs_errors(specs: Any) -> list[str]:
    """What is wrong with a list of evaluator specs (``[{"name": ..., "config": {...}}]``); [] if nothing."""
    if not isinstance(specs, list) or not specs:
        return ["A list of one or more evaluators: [{\"name\": \"run_succeeded\"}]."]
    if len(specs) > 50:
        return ["At most 50 evaluators."]
    problems = []
    for n, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or set(spec) - {"name", "config"}:
            problems.append(f"#{n}: an object with a name (and optionally a config).")
            continue
        evaluator = REGISTRY.get(spec["name"])
        if evaluator is None:
            problems.append(f"#{n}: no evaluator is called {spec['name']!r} (known: {', '.join(sorted(REGISTRY))}).")
            continue
        try:
            for error in Draft202012Validator(evaluator.config_schema).iter_errors(spec.get("config") or {}):
                where = "/".join(str(p) for p in error.absolute_path)
                problems.append(f"#{n} ({spec['name']}){' ' + where if where else ''}: {error.message}")
        except SchemaError as exc:  # pragma: no cover - schemas are checked at registration
            problems.append(str(exc))
        extra = evaluator.check_config(spec.get("config") or {}) if hasattr(evaluator, "check_config") else None
        if extra:
            problems.append(f"#{n} ({spec['name']}): {extra}")
    return problems


def finite_number(value: Any) -> float | None:
    """A number as a producer or a model sent it, if it is a finite one (a bool, a string, an int too
    large for a float, NaN or infinity: None)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value) if abs(value) < 1e300 else None
    return value if value is not None and math.isfinite(value) else None


# --- reading a run's output -----------------------------------------------------------------------

OUTPUT_TEXT_KEYS = ("content", "text", "output", "answer", "result", "message")


def output_text(value: Any) -> str | None:
    """The final answer's text: a string as is; a message (or a list of them: the last) by its content;
    a dict by its usual text key; anything else as canonical JSON. None for no output."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return output_text(value[-1])
    if isinstance(value, dict):
        for key in OUTPUT_TEXT_KEYS:
            if isinstance(value.get(key), str):
                return value[key]
            if isinstance(value.get(key), dict | list):
                return output_text(value[key])
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not (value.strip() if isinstance(value, str)
                                                                            else value))


REFUSAL_RE = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i|i apologi[sz]e,? but|as an ai\b|i can(?:no|')t (?:help|assist|"
    r"comply|do that|provide)|i (?:cannot|can't|won't|will not|am unable to|'m unable to|am not able to) "
    r"(?:help|assist|comply|do that|provide|fulfil))", re.IGNORECASE)
TRUNCATED_REASONS = {"length", "max_tokens", "max_output_tokens"}
REFUSAL_REASONS = {"content_filter", "refusal", "safety"}


def _finish_reason(message: Any) -> str:
    if isinstance(message, dict):
        reason = message.get("finish_reason") or message.get("stop_reason") or ""
        return str(reason).lower()
    return ""


# --- the built-ins ----------------------------------------------------------------------------------


@register
class RunSucceeded(Evaluator):
    name = "run_succeeded"
    description = "Passes when the run completed (fails for failed, lost and cancelled runs)."

    def evaluate(self, facts, config):
        run = facts.run
        if not run.is_terminal:
            return None
        ok = run.status == run.Status.COMPLETED
        return Result(score=1.0 if ok else 0.0, passed=ok, label=run.status,
                      explanation="" if ok else f"The run ended {run.status}"
                                                + (f" ({run.error_code})" if run.error_code else "") + ".")


@register
class SilentSuccess(Evaluator):
    name = "silent_success"
    description = ("Fails a run reported COMPLETED that holds an unrecovered error span, a failed tool call, an "
                   "empty or truncated final output, a refusal, or a loop whose winner failed its verdict.")
    config_schema = {"type": "object", "additionalProperties": False, "properties": {
        "require_output": {"type": "boolean", "description": "An empty final output counts (default true)."}}}
    needs = frozenset({"errors", "tools", "last_llm", "loops"})

    def evaluate(self, facts, config):
        run = facts.run
        if run.status != run.Status.COMPLETED:
            return None  # a failure that says so is not silent
        reasons: list[tuple[str, str]] = []  # (label, why)
        for tool in facts.failed_tools:
            reasons.append(("tool_failed", f"tool {tool['name']} failed"
                                           + (f": {tool['error'][:200]}" if tool.get("error") else "")))
        if facts.unrecovered_error and facts.unrecovered_error not in {t["span_id"] for t in facts.failed_tools}:
            reasons.append(("error_span", f"span {facts.unrecovered_error} ended in error and was never recovered"))
        last = facts.last_llm or {}
        reason = _finish_reason((last.get("output_messages") or [None])[-1]) or last.get("finish_reason", "")
        text = output_text(run.output)
        if config.get("require_output", True) and _empty(run.output):
            reasons.append(("empty_output", "the run's final output is empty"))
        if reason in TRUNCATED_REASONS or _finish_reason(run.output) in TRUNCATED_REASONS:
            reasons.append(("truncated", f"the last model call stopped at its token limit ({reason or 'length'})"))
        last_message = (last.get("output_messages") or [None])[-1]
        if (reason in REFUSAL_REASONS or (isinstance(last_message, dict) and last_message.get("refusal"))
                or (text and REFUSAL_RE.match(text[:300]))):
            reasons.append(("refusal", "the final answer is a refusal"))
        for loop in facts.loops:
            winner = next((n for n in loop["nodes"] if n["winner"]), None)
            if winner is not None and winner["valid"] is False:
                reasons.append(("loop_winner_invalid", f"loop {loop['name'] or loop['span_id']}: the winning "
                                                       f"iteration {winner['index']} failed its verdict"))
        if not reasons:
            return Result(score=1.0, passed=True, label="ok")
        return Result(score=0.0, passed=False, label=reasons[0][0],
                      explanation="Completed, but " + "; ".join(why for _, why in reasons) + ".")


def _threshold(config: dict, agent: str, key: str) -> Any:
    per_agent = config.get("per_agent") or {}
    return per_agent.get(agent, config.get(key))


@register
class LatencySLO(Evaluator):
    name = "latency_slo"
    description = "Passes when the run took at most max_ms (per_agent overrides it for named agents)."
    config_schema = {"type": "object", "additionalProperties": False, "required": ["max_ms"], "properties": {
        "max_ms": {"type": "number", "exclusiveMinimum": 0},
        "per_agent": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}}}}

    def evaluate(self, facts, config):
        run = facts.run
        if run.duration_ms is None:
            return None
        limit = float(_threshold(config, run.agent_name, "max_ms"))
        ok = run.duration_ms <= limit
        return Result(score=round(run.duration_ms, 3), passed=ok, label="within" if ok else "over",
                      explanation=f"{run.duration_ms:,.0f} ms {'≤' if ok else '>'} {limit:,.0f} ms")


@register
class CostSLO(Evaluator):
    name = "cost_slo"
    description = "Passes when the run cost at most max_usd (per_agent overrides it); unpriced runs are labelled."
    config_schema = {"type": "object", "additionalProperties": False, "required": ["max_usd"], "properties": {
        "max_usd": {"type": ["number", "string"], "pattern": r"^\d+(\.\d+)?$", "minimum": 0},
        "per_agent": {"type": "object", "additionalProperties": {"type": ["number", "string"],
                                                                 "pattern": r"^\d+(\.\d+)?$", "minimum": 0}}}}

    def evaluate(self, facts, config):
        run = facts.run
        if not run.is_terminal:
            return None
        limit = Decimal(str(_threshold(config, run.agent_name, "max_usd")))
        if run.cost_usd is None:
            return Result(label="unpriced", explanation="No call of this run was priced.")
        ok = run.cost_usd <= limit
        return Result(score=float(run.cost_usd), passed=ok, label="within" if ok else "over",
                      explanation=f"${run.cost_usd:.6f} {'≤' if ok else '>'} ${limit}")


@register
class ToolErrorRate(Evaluator):
    name = "tool_error_rate"
    description = "The share of the run's tool calls that failed; passes at or under max_rate (default 0)."
    config_schema = {"type": "object", "additionalProperties": False, "properties": {
        "max_rate": {"type": "number", "minimum": 0, "maximum": 1}}}
    needs = frozenset({"tools"})

    def evaluate(self, facts, config):
        total, failed = facts.tool_calls, facts.tool_errors
        if not total:
            return None
        rate = failed / total
        ok = rate <= config.get("max_rate", 0)
        return Result(score=rate, passed=ok, label=f"{failed}/{total} failed",
                      explanation=f"{failed} of {total} tool calls failed")


@register
class JsonValid(Evaluator):
    name = "json_valid"
    description = "Passes when the final output is JSON (a string that parses), optionally valid against a schema."
    config_schema = {"type": "object", "additionalProperties": False, "properties": {"schema": {"type": "object"}}}

    def check_config(self, config: dict) -> str | None:
        try:
            Draft202012Validator.check_schema(config.get("schema") or {})
        except SchemaError as exc:
            return f"schema is not a JSON Schema: {exc.message}"
        return None

    def evaluate(self, facts, config):
        out = facts.run.output
        if out is None:
            return Result(score=0.0, passed=False, label="empty", explanation="The run has no output.")
        if isinstance(out, str):
            try:
                out = json.loads(out)
            except ValueError as exc:
                return Result(score=0.0, passed=False, label="invalid_json", explanation=f"Not JSON: {exc}")
        if config.get("schema"):
            errors = sorted(Draft202012Validator(config["schema"]).iter_errors(out), key=lambda e: list(e.path))
            if errors:
                where = "/".join(str(p) for p in errors[0].absolute_path)
                return Result(score=0.0, passed=False, label="schema_mismatch",
                              explanation=f"{where or '(root)'}: {errors[0].message}"[:1000])
        return Result(score=1.0, passed=True, label="valid")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


MAX_SCANNED = 100_000  # characters of an output the text evaluators look at


@register
class Contains(Evaluator):
    name = "contains"
    description = "Passes when the final output contains the text (or, with negate, does not)."
    config_schema = {"type": "object", "additionalProperties": False, "required": ["text"], "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 10000},
        "case_sensitive": {"type": "boolean"}, "negate": {"type": "boolean"}}}

    def evaluate(self, facts, config):
        text = (output_text(facts.run.output) or "")[:MAX_SCANNED]
        needle = config["text"]
        found = needle in text if config.get("case_sensitive") else needle.casefold() in text.casefold()
        ok = found != bool(config.get("negate"))
        return Result(score=1.0 if ok else 0.0, passed=ok, label="found" if found else "absent",
                      explanation=f"{needle[:80]!r} {'found' if found else 'not found'} in the output")


@register
class Regex(Evaluator):
    name = "regex"
    description = "Passes when the final output matches the pattern (Python syntax; or, with negate, does not)."
    config_schema = {"type": "object", "additionalProperties": False, "required": ["pattern"], "properties": {
        "pattern": {"type": "string", "minLength": 1, "maxLength": 1000},
        "ignore_case": {"type": "boolean"}, "negate": {"type": "boolean"}}}

    def check_config(self, config: dict) -> str | None:
        try:
            re.compile(config.get("pattern", ""))
        except re.error as exc:
            return f"pattern does not compile: {exc}"
        return None

    def evaluate(self, facts, config):
        pattern = re.compile(config["pattern"], re.IGNORECASE if config.get("ignore_case") else 0)
        found = pattern.search((output_text(facts.run.output) or "")[:MAX_SCANNED]) is not None
        ok = found != bool(config.get("negate"))
        return Result(score=1.0 if ok else 0.0, passed=ok, label="match" if found else "no_match")


@register
class ExpectedOutput(Evaluator):
    name = "expected_output"
    description = ("Compares the final output with the reference attached to the run (its metadata's "
                   "expected_output, or the config's expected): exact, or normalised (case, spacing, "
                   "punctuation and JSON key order ignored).")
    config_schema = {"type": "object", "additionalProperties": False, "properties": {
        "mode": {"enum": ["exact", "normalised"]}, "expected": {}}}

    def evaluate(self, facts, config):
        run = facts.run
        expected = (run.metadata or {}).get("expected_output", config.get("expected"))
        if expected is None:
            return None  # nothing to compare with
        got = run.output
        if config.get("mode", "normalised") == "exact":
            ok = got == expected or output_text(got) == output_text(expected)
        else:
            a, b = output_text(got), output_text(expected)
            ok = a is not None and b is not None and (_normalise(a) == _normalise(b) or _json_equal(a, b))
        return Result(score=1.0 if ok else 0.0, passed=ok, label="match" if ok else "mismatch",
                      explanation="" if ok else f"expected {str(output_text(expected))[:200]!r}, "
                                                f"got {str(output_text(got))[:200]!r}")


def _json_equal(a: str, b: str) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


# The evaluators that call out, in modules of their own (registered on import).
from . import judge  # noqa: E402, F401
