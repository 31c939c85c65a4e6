"""What evaluators read about a run, loaded for a whole chunk of runs at once: a few queries per chunk
whatever its size (the batch's speed), and only what the chunk's evaluators need (``Evaluator.needs``).
Runs come from the run log's public models (Run, Span, ToolCall) and selectors."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from django.db import connection
from django.db.models import Count, F, Q, Window
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import RowNumber

from apps.traces import selectors as traces
from apps.traces.models import Run, Span, ToolCall


@dataclass
class RunFacts:
    run: Run
    unrecovered_error: str = ""           # "errors": the latest error span nothing recovered
    tool_calls: int = 0                   # "tools": how many tool calls, how many failed
    tool_errors: int = 0
    failed_tools: list[dict] = field(default_factory=list)  # "tools": failed and not recovered by a retry
    last_llm: dict | None = None          # "last_llm": the run's last model call (output messages, status)
    loops: list[dict] = field(default_factory=list)  # "loops": the run's loops with their verdicts


def load(runs: list[Run], needs: set[str]) -> list[RunFacts]:
    facts = {run.pk: RunFacts(run=run) for run in runs}
    if "errors" in needs:
        with_errors = [r.pk for r in runs if r.error_span_count]
        for pk, span_id in traces.unrecovered_error_spans(with_errors).items():
            facts[pk].unrecovered_error = span_id
    if "tools" in needs:
        _tools(facts)
    if "last_llm" in needs:
        _last_llm(facts)
    if "loops" in needs:
        for run in runs:
            if run.has_loop:
                facts[run.pk].loops = traces.run_loops(run)
    return [facts[r.pk] for r in runs]


def _tools(facts: dict[int, RunFacts]) -> None:
    failed_runs = set()
    for row in (ToolCall.objects.filter(run_id__in=list(facts)).values("run_id")
                .annotate(n=Count("id"), failed=Count("id", filter=Q(status=ToolCall.Status.ERROR)))):
        facts[row["run_id"]].tool_calls = row["n"]
        facts[row["run_id"]].tool_errors = row["failed"]
        if row["failed"]:
            failed_runs.add(row["run_id"])
    if not failed_runs:
        return
    failed = list(ToolCall.objects.filter(run_id__in=failed_runs, status=ToolCall.Status.ERROR)
                  .order_by("started_at", "id").values("run_id", "name", "error", "span__span_id"))
    # A failed call that a later attempt recovered (retry_of / fallback_of naming it, not an error) is
    # how agents are meant to work, not a silent failure.
    recovered = defaultdict(set)
    for run_pk, retry_of, fallback_of in (Span.objects.filter(run_id__in=failed_runs)
                                          .filter(~Q(retry_of="") | ~Q(fallback_of="")).exclude(status="error")
                                          .values_list("run_id", "retry_of", "fallback_of")):
        recovered[run_pk] |= {retry_of, fallback_of}
    for row in failed:
        if row["span__span_id"] not in recovered[row["run_id"]]:
            facts[row["run_id"]].failed_tools.append(
                {"name": row["name"], "error": row["error"], "span_id": row["span__span_id"]})


def _last_llm(facts: dict[int, RunFacts]) -> None:
    spans = Span.objects.filter(run_id__in=list(facts), kind="llm")
    if connection.vendor == "postgresql":  # DISTINCT ON: one pass over the sorted spans, no window
        spans = spans.order_by("run_id", "-start_time", "-id").distinct("run_id")
    else:
        spans = (spans.annotate(rank=Window(RowNumber(), partition_by=[F("run_id")],
                                            order_by=[F("start_time").desc(), F("id").desc()])).filter(rank=1))
    # Only the attribute read, not the span's whole attribute map.
    rows = spans.values("run_id", "span_id", "status", "output_messages",
                        reasons=KeyTransform("gen_ai.response.finish_reasons", "attributes"))
    for row in rows:
        reasons = row["reasons"]
        facts[row["run_id"]].last_llm = {
            "span_id": row["span_id"], "status": row["status"], "output_messages": row["output_messages"] or [],
            "finish_reason": str(reasons[-1] if isinstance(reasons, list) and reasons else reasons or "").lower()}
