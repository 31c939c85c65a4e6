"""The run log's write side, as other apps and the API see it. Its modules:

* ``inbox``: accept a write durably (``batch_accept``), lease, retry, dead-letter, sweep;
* ``projection``: records in, runs / spans / span updates / tool calls out (idempotent);
* ``spans``: the effective span (a span merged with its late updates) and what it adds to its run;
* ``live``: what is broadcast and signalled once a projection commits;
* ``housekeeping``: lost runs, retention, statistics.

Other apps use this module, ``selectors``, ``signals`` and the record contract (``records``) only; the
modules above, ``admission`` (rate limit and backlog at every door) and the models other than Run, Span
and ToolCall are the run log's own. Everything here is re-exported or defined once.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from . import projection, spans
from .admission import Refusal, admit  # noqa: F401 - every door admits a key the same way
from .inbox import (  # noqa: F401 - the public write surface
    batch_accept,
    batch_reproject,
    dead_letter_counts,
    dead_record_reproject,
    inbox_drain,
    inbox_step,
    inbox_sweep,
    seconds_until_leases_expire,
)
from .models import Run, Span, SpanUpdate

Decoder = Any  # Callable[[payload (JSON or None), raw (bytes or None)], list[record]]; raises RecordError


def register_decoder(kind: str, decoder: Decoder) -> None:
    """Let the projection read inbox batches of ``kind``: ``decoder(payload, raw)`` returns canonical
    records (``records``) or raises ``records.RecordError`` (the batch is then dead-lettered)."""
    projection.DECODERS[kind] = decoder


def run_totals_compute(run: Run) -> dict[str, Any]:
    """A run's derived totals computed afresh from its spans and updates (writes nothing): what the
    projection's incremental totals must equal (a check in tests, the basis of a repair)."""
    totals = dict.fromkeys(spans.CONTRIBUTION_FIELDS, 0)
    models_used: list[str] = []
    providers_used: list[str] = []
    for _, eff, _ in spans.effective_spans(run):
        for name, value in zip(spans.CONTRIBUTION_FIELDS, spans.contribution(eff), strict=True):
            totals[name] += value
        for value, bucket in ((eff.get("model"), models_used), (eff.get("response_model"), models_used),
                              (eff.get("provider"), providers_used)):
            if value and value not in bucket:
                bucket.append(value)
    return {**totals, "models_used": sorted(models_used), "providers_used": sorted(providers_used)}



def spans_effective_between(*, project_id: int, start, end, chunk: int = 2000) -> Iterator[tuple[Run, int, dict]]:
    """Every span of a project that started in [start, end), as (its run, its row id, its effective
    form), in row order, a chunk at a time (three queries per chunk). For repairs that re-derive
    something from the spans (the costs' ``costs_rederive``); never on a read path."""
    last = 0
    while True:
        rows = list(Span.objects.filter(project_id=project_id, start_time__gte=start, start_time__lt=end, pk__gt=last)
                    .order_by("pk")[:chunk])
        if not rows:
            return
        last = rows[-1].pk
        runs = Run.objects.in_bulk({s.run_id for s in rows})
        updates: dict[tuple[int, str], list[dict]] = defaultdict(list)
        for run_pk, span_id, fields in (SpanUpdate.objects.filter(run_id__in=runs, span_id__in={s.span_id for s in rows})
                                        .order_by("id").values_list("run_id", "span_id", "fields")):
            updates[(run_pk, span_id)].append(fields)
        for s in rows:
            yield runs[s.run_id], s.pk, spans.merge_span(spans.span_to_record(s), updates.get((s.run_id, s.span_id), []))


def run_cost_set(*, run_pk: int, cost_nanos: int | None) -> None:
    """Set a run's cost (a repair: the projection keeps it in step through ``Run.add_cost``)."""
    Run.objects.filter(pk=run_pk).update(cost_usd=None if cost_nanos is None else Decimal(cost_nanos).scaleb(-9))
