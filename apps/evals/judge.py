"""``llm_judge``: a rubric, the run's input and final output, sent to a model through our own gateway
over HTTP, exactly as an agent's call goes (so the judge is traced as a run of its own, costed, and
held to the project's daily caps like any call); the model's JSON verdict becomes the score.

The judge holds an API key of the evaluated run's project with the gateway's scopes (``budget`` and
``ingest``), read from the environment variable the configuration names (as upstream secrets are: no
secret is stored in a configuration). What can go wrong is an evaluator error with its code, never a
score: ``judge_key_missing`` / ``judge_key_rejected`` (no usable key, or one of another project),
``budget_exceeded`` (the gateway refused: a cap would be passed; nothing was sent to the model),
``judge_call_failed`` (the gateway or the model failed, timed out or was unreachable) and
``judge_unparseable`` (the answer is no verdict). The score's details name the judge's own run.

The judge's runs (agent ``evals.llm_judge``) are never evaluated after the run themselves: a judge of
judges would call itself forever.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from typing import Any

import httpx
from django.conf import settings
from rest_framework.exceptions import AuthenticationFailed

from apps.projects.services import api_key_authenticate

from .evaluators import Evaluator, EvaluatorError, Result, finite_number, output_text, register

JUDGE_AGENT = "evals.llm_judge"
DEFAULT_KEY_ENV = "EVALS_JUDGE_API_KEY"

SYSTEM_PROMPT = (
    "You are an impartial evaluator of an AI agent's work. Judge the agent's final output against the rubric, "
    "using the input (and the reference answer, when one is given) as context. Reply with only a JSON object, "
    'nothing around it: {"score": <a number from 0 (worst) to 1 (best)>, "passed": <true or false>, '
    '"label": "<one or two words>", "explanation": "<one to three sentences>"}.')

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)

_client: httpx.Client | None = None
_client_lock = threading.Lock()


def client() -> httpx.Client:
    """One connection pool per process (a worker judges run after run)."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(headers={"user-agent": "controlplane-evals/1"})
        return _client


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… [{len(text) - limit:,} more characters cut]"


def _as_text(value: Any) -> str:
    if value is None:
        return "(none)"
    text = output_text(value)
    return text if text is not None else "(none)"


def prompt(run, config: dict) -> list[dict]:
    """The messages sent: the instructions, then the rubric and the run."""
    limit = config.get("max_chars", 8000)
    parts = [f"## Rubric\n{config['rubric']}",
             f"## The run\nAgent: {run.agent_name or '(unnamed)'}"
             + (f" (version {run.agent_version})" if run.agent_version else "") + f"\nStatus: {run.status}",
             f"## Input\n{_clip(_as_text(run.input), limit)}",
             f"## Final output\n{_clip(_as_text(run.output), limit)}"]
    expected = (run.metadata or {}).get("expected_output")
    if expected is not None:
        parts.append(f"## Reference answer\n{_clip(_as_text(expected), limit)}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_verdict(text: str, config: dict) -> Result:
    """The model's answer as a Result, or ``judge_unparseable``. The verdict may sit in a code fence or
    between words; its score must be a number from 0 to 1. Pass or fail: the score against the
    configured ``pass_threshold`` where one is set, else the judge's own ``passed``, else score ≥ 0.5."""
    candidates = [text.strip()]
    fenced = _FENCE.search(text)
    if fenced:
        candidates.insert(0, fenced.group(1).strip())
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    verdict = None
    for candidate in candidates:
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            verdict = parsed
            break
    if verdict is None:
        raise EvaluatorError("judge_unparseable", f"The judge's answer holds no JSON verdict: {text[:300]!r}")
    raw_score, said = verdict.get("score"), verdict.get("passed")
    score = finite_number(raw_score)
    if raw_score is not None and (score is None or not 0 <= score <= 1):
        raise EvaluatorError("judge_unparseable", f"The verdict's score is not a number from 0 to 1: {raw_score!r}")
    if said is not None and not isinstance(said, bool):
        raise EvaluatorError("judge_unparseable", f"The verdict's passed is not true or false: {said!r}")
    if score is None and said is None:
        raise EvaluatorError("judge_unparseable", "The verdict has neither a score nor passed.")
    if score is None:
        score = 1.0 if said else 0.0
    if "pass_threshold" in config:
        passed = score >= config["pass_threshold"]
    else:
        passed = said if said is not None else score >= 0.5
    label = verdict.get("label")
    explanation = verdict.get("explanation")
    return Result(score=score, passed=passed, label=label[:100] if isinstance(label, str) else "",
                  explanation=explanation[:4000] if isinstance(explanation, str) else "")


def _gateway_message(resp: httpx.Response) -> str:
    try:
        error = resp.json().get("error") or {}
        return str(error.get("message") or error)[:1000]
    except (ValueError, AttributeError):
        return resp.text[:300]


@register
class LLMJudge(Evaluator):
    name = "llm_judge"
    version = "1"
    deterministic = False
    description = ("A model judges the final output against a rubric, through the project's own gateway (traced as a "
                   "run of agent evals.llm_judge, costed, capped). The key: an API key of the project with the "
                   "budget and ingest scopes, in the environment variable api_key_env names (default "
                   f"{DEFAULT_KEY_ENV}). A changed model, rubric or threshold is a new version: earlier verdicts stay.")
    config_schema = {"type": "object", "additionalProperties": False, "required": ["model", "rubric"], "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 200},
        "rubric": {"type": "string", "minLength": 1, "maxLength": 20000},
        "api_key_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "maxLength": 100},
        "pass_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 16, "maximum": 8192},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 120},
        "json_mode": {"type": "boolean", "description": "Ask for response_format json_object (default true)."},
        "max_chars": {"type": "integer", "minimum": 100, "maximum": 200000,
                      "description": "Characters of the input, output and reference each sent (default 8000)."}}}

    def version_of(self, config: dict) -> str:
        judged_by = json.dumps([config.get("model"), config.get("rubric"), config.get("pass_threshold")])
        return f"{self.version}.{hashlib.sha256(judged_by.encode()).hexdigest()[:8]}"

    def evaluate(self, facts, config):
        run = facts.run
        if not run.is_terminal:
            return None
        env_name = config.get("api_key_env", DEFAULT_KEY_ENV)
        raw = os.environ.get(env_name, "").strip()
        if not raw:
            raise EvaluatorError("judge_key_missing", f"Set {env_name} (where the workers run) to an API key of this "
                                                      "project with the budget and ingest scopes.")
        try:
            key = api_key_authenticate(raw)
        except AuthenticationFailed as exc:
            raise EvaluatorError("judge_key_rejected", f"The key in {env_name}: {exc.detail}") from None
        if key.project_id != run.project_id:
            raise EvaluatorError("judge_key_rejected", f"The key in {env_name} belongs to another project: a judge's "
                                                       "calls are charged to the evaluated run's project.")
        body: dict[str, Any] = {"model": config["model"], "messages": prompt(run, config),
                                "max_tokens": config.get("max_tokens", 512),
                                "temperature": config.get("temperature", 0)}
        if config.get("json_mode", True):
            body["response_format"] = {"type": "json_object"}
        url = f"{settings.EVALS_GATEWAY_URL.rstrip('/')}/chat/completions"
        try:
            resp = client().post(url, json=body, timeout=config.get("timeout_seconds", 60), headers={
                "authorization": f"Bearer {raw}", "x-agent-name": JUDGE_AGENT, "x-end-user": f"run:{run.run_id}"[:256]})
        except httpx.HTTPError as exc:
            raise EvaluatorError("judge_call_failed",
                                 f"The gateway at {url} did not answer: {type(exc).__name__} {exc}") from None
        details = {"model": config["model"], "judge_run_id": resp.headers.get("x-controlplane-run-id", "")}
        if resp.status_code == 402:
            raise EvaluatorError("budget_exceeded", f"The gateway refused the judge's call: {_gateway_message(resp)}",
                                 details)
        if resp.status_code != 200:
            raise EvaluatorError("judge_call_failed",
                                 f"The gateway answered {resp.status_code}: {_gateway_message(resp)}", details)
        try:
            choice = resp.json()["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise EvaluatorError("judge_unparseable", f"Not a chat completion: {resp.text[:300]!r}", details) from None
        try:
            result = parse_verdict(text, config)
        except EvaluatorError as exc:
            exc.details = details
            raise
        result.details = details
        return result
