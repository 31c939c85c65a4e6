"""Evaluating runs and storing the scores: shared by "after each run" (``services.after_run_step``), the
batch jobs and the benchmark. ``evaluate`` judges (no writes); ``store`` writes what it judged with
one insert that skips every score already held (unique per run, span, evaluator and version), so a
repeat, a redelivered task or a resumed batch adds nothing and changes nothing; an evaluator error
already held is the one row a later success takes over."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from apps.common.bulk import insert_rows_ignoring_conflicts
from apps.traces.models import Run

from . import evaluators, facts
from .evaluators import Evaluator, EvaluatorError
from .models import EvalScore

logger = logging.getLogger(__name__)

# The fields a score row is written with (besides its keys and its producer).
RESULT_FIELDS = ("score", "passed", "label", "explanation", "outcome", "error_code", "details")


@dataclass(frozen=True)
class Spec:
    evaluator: Evaluator
    config: dict

    @property
    def name(self) -> str:
        return self.evaluator.name

    @property
    def version(self) -> str:
        return self.evaluator.version_of(self.config)


def specs_of(raw: list[dict]) -> list[Spec]:
    """Specs as configured (validated when saved): an evaluator since removed is skipped."""
    out = []
    for item in raw or ():
        evaluator = evaluators.get(item.get("name", ""))
        if evaluator is not None:
            out.append(Spec(evaluator, item.get("config") or {}))
    return out


def evaluate(runs: list[Run], specs: list[Spec], producer: dict[str, Any]) -> list[dict]:
    """Score rows for ``runs`` (one per run and evaluator that applies), with ``producer`` (source and
    config / job / key / user ids) on each. An evaluator that raises is an evaluator error row."""
    needs = set().union(*(s.evaluator.needs for s in specs)) if specs else set()
    rows = []
    for f in facts.load(runs, needs):
        run = f.run
        for spec in specs:
            try:
                result = spec.evaluator.evaluate(f, spec.config)
            except EvaluatorError as exc:
                rows.append(_error_row(run, spec, producer, exc.code, exc.message, exc.details))
                continue
            except Exception as exc:  # noqa: BLE001 - one evaluator's bug is a visible error, not a crashed batch
                logger.exception("evaluator %s failed on run %s", spec.name, run.pk)
                rows.append(_error_row(run, spec, producer, "evaluator_crashed", f"{type(exc).__name__}: {exc}"))
                continue
            if result is None:
                continue
            rows.append({"project_id": run.project_id, "run_id": run.pk, "span_id": result.span_id,
                         "evaluator": spec.name, "version": spec.version, "score": result.score,
                         "passed": result.passed, "label": result.label[:100], "explanation": result.explanation,
                         "outcome": EvalScore.Outcome.SCORED, "error_code": "", "details": result.details,
                         **producer})
    return rows


def _error_row(run: Run, spec: Spec, producer: dict, code: str, message: str, details: dict | None = None) -> dict:
    return {"project_id": run.project_id, "run_id": run.pk, "span_id": "", "evaluator": spec.name,
            "version": spec.version, "score": None, "passed": None, "label": "",
            "explanation": message[:2000], "outcome": EvalScore.Outcome.ERROR, "error_code": code[:64],
            "details": details or {}, **producer}


def _key(row: dict) -> tuple:
    return row["run_id"], row["span_id"], row["evaluator"], row["version"]


def store(rows: list[dict]) -> int:
    """Write the rows: new ones inserted, those already held left as they are, except an evaluator
    error that this attempt scored (taken over: its outcome changes from error to scored). Returns how
    many rows were added or taken over."""
    if not rows:
        return 0
    added = insert_rows_ignoring_conflicts(EvalScore, rows)
    scored = {_key(r): r for r in rows if r["outcome"] == EvalScore.Outcome.SCORED}
    if not scored:
        return added
    errors = list(EvalScore.objects.filter(run_id__in={k[0] for k in scored}, evaluator__in={k[2] for k in scored},
                                           outcome=EvalScore.Outcome.ERROR))
    for held in errors:
        new = scored.get((held.run_id, held.span_id, held.evaluator, held.version))
        if new is not None:
            # Conditional: a concurrent take-over of the same error changes it once.
            added += EvalScore.objects.filter(pk=held.pk, outcome=EvalScore.Outcome.ERROR).update(
                **{f: new[f] for f in RESULT_FIELDS}, source=new["source"], config_id=new.get("config_id"),
                job_run_id=new.get("job_run_id"))
    return added
