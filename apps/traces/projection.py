"""The projection: canonical records (``records``) in, runs, spans, span updates and tool calls out.

It runs on a worker, over batches the inbox (``inbox``) has leased, inside the caller's transaction.
It is idempotent: a span already stored (same project, trace id and span id) is skipped, and run
totals move by the difference a batch makes to the *effective* spans (``spans``: span + its updates),
computed under a row lock on each run touched. Re-projecting a batch, or receiving a span twice,
therefore never counts anything twice.

``apply_records`` is the one entry point for records of any producer; its steps, in order, are the
methods of :class:`_Application`. Apps above traces hook in through ``signals.spans_projected`` (sent
inside the transaction, with what changed) and, after commit, ``run_changed`` / ``run_finished``.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from django.db import connection
from django.db.models import Q
from django.utils import timezone

from apps.common.bulk import insert_rows, insert_rows_ignoring_conflicts, update_objects
from apps.projects.models import Project

from . import records, signals, spans
from .live import RunChanges
from .models import LOOP_KINDS, TOKEN_FIELDS, IngestBatch, Run, Span, SpanUpdate, ToolCall
from .records import BIGINT_MAX, RecordError, parse_time, trace_id_for_run

logger = logging.getLogger(__name__)

OPS = ("run.start", "span", "span.update", "run.finish")


class PoisonBatch(Exception):
    """A batch that no retry can project (no decoder for its kind, a payload that does not decode)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# --- decoding -------------------------------------------------------------------------------------

# A decoder turns a stored payload into canonical records. "records" payloads are canonical already;
# higher apps (OTLP ingest) register theirs from AppConfig.ready() (``services.register_decoder``).
# It is given the batch's JSON payload and its raw bytes, never the inbox row.
DECODERS: dict[str, Any] = {"records": lambda payload, raw: payload}


def decode(batch: IngestBatch) -> list[dict]:
    decoder = DECODERS.get(batch.kind)
    if decoder is None:
        raise PoisonBatch("unknown_kind", f"no decoder for batch kind {batch.kind!r}")
    try:
        records = decoder(batch.payload, None if batch.raw is None else bytes(batch.raw))
    except RecordError as exc:
        raise PoisonBatch("invalid_record", str(exc)) from exc
    if not isinstance(records, list):
        raise PoisonBatch("invalid_record", "payload is not a list of records")
    for i, problem in decode_problems(records):
        raise PoisonBatch("invalid_record", f"record {i}: {problem}")
    return records


def decode_problems(records: list) -> list[tuple[int, str]]:
    """What makes records unreadable to the projection at all (their op and run id), by position."""
    problems = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or rec.get("op") not in OPS:
            problems.append((i, f"unknown op {rec.get('op') if isinstance(rec, dict) else rec!r}"))
        elif not isinstance(rec.get("run_id"), str) or not rec["run_id"]:
            problems.append((i, "run_id missing"))
    return problems


def redactors(project_ids) -> dict[int, Any]:
    """Each project's redactor (None where it would change nothing)."""
    out = {}
    for project in Project.objects.filter(pk__in=set(project_ids)).only(
            "pk", "redaction_enabled", "redaction_patterns", "redaction_exempt_attributes"):
        redactor = project.redactor()
        out[project.pk] = redactor if redactor.active else None
    return out


def redacted(rec: dict, redactor) -> dict:
    """The record as it may be stored: with the project's redaction applied (None: none)."""
    return records.redact(rec, redactor) if redactor is not None else rec


def commit_without_flush() -> None:
    """Let the current transaction commit without waiting for its WAL flush (PostgreSQL).

    Safe for the projection and its claims, and only for them: the accepted batch is already durable
    (its INSERT commits normally), so a crash that loses a projection's last commits loses nothing but
    the work, and the batch's lease expires and it is projected again. It saves a disk flush wait per
    transaction on the worker's path."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def apply_batches(batches: list[IngestBatch], changes: RunChanges) -> None:
    """Decode, redact and apply the batches, then mark them done, in the caller's transaction;
    nothing unredacted reaches Run / Span / ToolCall."""
    commit_without_flush()
    by_project: dict[int, list[tuple[IngestBatch, dict]]] = defaultdict(list)
    project_redactors = redactors(b.project_id for b in batches)
    for batch in batches:
        redactor = project_redactors.get(batch.project_id)
        for rec in decode(batch):
            by_project[batch.project_id].append((batch, redacted(rec, redactor)))
    for project_id in sorted(by_project):
        apply_records(project_id, by_project[project_id], changes)
    IngestBatch.objects.filter(pk__in=[b.pk for b in batches]).update(
        status=IngestBatch.Status.DONE, payload=None, raw=None, lease_expires_at=None, processed_at=timezone.now(),
        error_code="", error="")


# --- applying records -------------------------------------------------------------------------------


def apply_records(project_id: int, items: list[tuple[IngestBatch, dict]], changes: RunChanges) -> None:
    """Apply one project's records (each with the batch it came in, in arrival order) inside the
    caller's transaction, adding what changed to ``changes``."""
    _Application(project_id, items, changes).run()


def _by_span_keys(model: type[Span] | type[SpanUpdate], project_id: int, keys: set[tuple[str, str]]) -> list:
    """The rows of ``model`` (Span or SpanUpdate) for these (trace id, span id) pairs, in id order.

    On PostgreSQL the pairs are joined as two arrays unnested side by side: one index probe per pair.
    (``trace_id IN (…) AND span_id IN (…)`` makes the btree walk every trace id x span id combination,
    which on a large table costs seconds; see bench/RESULTS.md.)"""
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(model._meta.db_table)
        pairs = sorted(keys)
        return list(model.objects.raw(
            f"SELECT r.* FROM {table} r JOIN unnest(%s::varchar[], %s::varchar[]) AS k(trace_id, span_id) "
            f"ON r.trace_id = k.trace_id AND r.span_id = k.span_id WHERE r.project_id = %s ORDER BY r.id",
            [[t for t, _ in pairs], [sp for _, sp in pairs], project_id]))
    rows = model.objects.filter(project_id=project_id, trace_id__any_of={t for t, _ in keys},
                                span_id__any_of={sp for _, sp in keys}).order_by("id")
    return [row for row in rows if (row.trace_id, row.span_id) in keys]


SpanKey = tuple[str, str]  # (trace id, span id)


class _Application:
    """One ``apply_records`` call. Its steps run in order (``run``), each a method below."""

    def __init__(self, project_id: int, items: list[tuple[IngestBatch, dict]], changes: RunChanges) -> None:
        self.project_id = project_id
        self.items = items
        self.changes = changes
        self.now = timezone.now()
        self.runs: dict[str, Run] = {}
        self.created_runs: list[str] = []  # run ids this application created (placeholders)
        self.dirty: set[str] = set()  # run ids whose row must be saved
        self.keys: set[SpanKey] = set()  # every span this batch touches
        self.stored: dict[SpanKey, Span] = {}
        self.prior_updates: dict[SpanKey, list[dict]] = defaultdict(list)
        self.base: dict[SpanKey, dict] = {}  # each span as first stored (or about to be)
        self.before: dict[SpanKey, dict | None] = {}  # effective spans before this batch
        self.new_updates: dict[SpanKey, list[dict]] = defaultdict(list)
        self.key_run: dict[SpanKey, Run] = {}
        self.span_rows: list[dict] = []
        self.update_rows: list[dict] = []
        self.parent_refs: dict[str, str] = {}
        self.projected: list[signals.SpanChange] = []
        self.attribution: dict[str, tuple] = {}  # each run's agent, version, end user and key as locked
        self.at_end: list[Callable[[], None]] = []  # receivers' last writes (see signals.spans_projected)
        self.finishing: dict[str, None] = {}  # run ids a run.finish record of this group touched, in order

    def run(self) -> None:
        self.lock_runs()
        self.load_span_state()
        for batch, rec in self.items:
            self.apply(batch, rec)
        span_pks = self.store_log()
        self.fold_spans(span_pks)
        self.link_runs()
        self.tell_listeners()
        self.settle_runs()
        if self.finishing and signals.runs_finishing.has_listeners(Run):
            signals.runs_finishing.send(sender=Run, project_id=self.project_id,
                                        runs=[self.runs[r] for r in self.finishing])
        for finish in self.at_end:
            finish()

    def lock_runs(self) -> None:
        """The runs touched: create placeholders for unknown ones, then lock them all (ordered by pk)."""
        first_seen: dict[str, tuple[IngestBatch, dict]] = {}
        earliest: dict[str, str] = {}
        for batch, rec in self.items:
            run_id = rec["run_id"]
            first_seen.setdefault(run_id, (batch, rec))
            when = (rec.get("started_at") if rec["op"] == "run.start"
                    else rec["span"].get("start_time") if rec["op"] == "span" else None)
            if when and (run_id not in earliest or when < earliest[run_id]):
                earliest[run_id] = when
        run_ids = list(first_seen)
        known = set(Run.objects.filter(project_id=self.project_id, run_id__any_of=run_ids)
                    .values_list("run_id", flat=True))
        placeholders = [
            {"project_id": self.project_id, "run_id": run_id,
             "trace_id": first_seen[run_id][1].get("trace_id") or trace_id_for_run(run_id),
             "api_key_id": first_seen[run_id][0].api_key_id, "status": Run.Status.RUNNING,
             "started_at": parse_time(earliest[run_id]) if run_id in earliest else self.now}
            for run_id in run_ids if run_id not in known
        ]
        insert_rows_ignoring_conflicts(Run, placeholders)
        self.created_runs = [p["run_id"] for p in placeholders]
        self.runs = {r.run_id: r for r in Run.objects.select_for_update()
                     .filter(project_id=self.project_id, run_id__any_of=run_ids).order_by("pk")}
        self.attribution = {run_id: run.attribution for run_id, run in self.runs.items()}

    def load_span_state(self) -> None:
        """Each span the batch touches as it stands before the batch (its row and earlier updates)."""
        for _, rec in self.items:
            if rec["op"] == "span":
                self.keys.add((self.runs[rec["run_id"]].trace_id, rec["span"]["span_id"]))
            elif rec["op"] == "span.update":
                self.keys.add((self.runs[rec["run_id"]].trace_id, rec["span_id"]))
        if self.keys:
            for span in _by_span_keys(Span, self.project_id, self.keys):
                self.stored[(span.trace_id, span.span_id)] = span
            for upd in _by_span_keys(SpanUpdate, self.project_id, self.keys):
                self.prior_updates[(upd.trace_id, upd.span_id)].append(upd.fields)
        self.base = {k: spans.span_to_record(s) for k, s in self.stored.items()}
        self.before = {k: spans.merge_span(self.base[k], self.prior_updates[k]) if k in self.base else None
                       for k in self.keys}

    def apply(self, batch: IngestBatch, rec: dict) -> None:
        """One record, in arrival order."""
        run = self.runs[rec["run_id"]]
        op = rec["op"]
        if op != "run.finish" and not (op == "span" and (run.trace_id, rec["span"]["span_id"]) in self.base) \
                and run.revive_if_lost():
            self.dirty.add(run.run_id)
        if op == "run.start" and rec.get("fill"):
            run.fill_blanks(rec)
            self.dirty.add(run.run_id)
        elif op == "run.start":
            run.record_start(rec, started_at=parse_time(rec["started_at"]), api_key_id=batch.api_key_id)
            if rec.get("parent_run_id"):
                self.parent_refs[run.run_id] = rec["parent_run_id"]
            self.dirty.add(run.run_id)
        elif op == "span":
            key = (run.trace_id, rec["span"]["span_id"])
            if key in self.base:
                return  # already stored (a re-send): spans are immutable, the first one stands
            self.base[key] = rec["span"]
            self.key_run[key] = run
            self.span_rows.append(spans.span_row(rec["span"], project_id=self.project_id, run=run,
                                                 trace_id=run.trace_id, batch_id=batch.pk))
            self.changes.new_spans[run.pk].append(key[1])
        elif op == "span.update":
            key = (run.trace_id, rec["span_id"])
            fields = dict(rec["fields"])
            if rec.get("at"):
                fields.setdefault("events", [])
                fields["events"] = [*fields["events"], {"name": "controlplane.span.updated", "time": rec["at"],
                                                        "attributes": {"fields": sorted(rec["fields"])}}]
            self.new_updates[key].append(fields)
            self.key_run.setdefault(key, run)
            self.update_rows.append({"project_id": self.project_id, "run_id": run.pk, "trace_id": key[0],
                                     "span_id": key[1], "fields": fields, "batch_id": batch.pk})
            self.changes.updated_spans[run.pk].append(key[1])
        elif op == "run.finish":
            run.record_finish(rec, ended_at=parse_time(rec["ended_at"]))
            self.changes.finished.add(run.pk)
            self.finishing[run.run_id] = None
            self.dirty.add(run.run_id)

    def store_log(self) -> dict[SpanKey, int]:
        """Append the new spans and span updates. Returns the row id of every span touched."""
        span_pks = {(row["trace_id"], row["span_id"]): pk
                    for row, pk in zip(self.span_rows, insert_rows(Span, self.span_rows), strict=True)}
        insert_rows(SpanUpdate, self.update_rows)
        span_pks.update({k: s.pk for k, s in self.stored.items()})
        return span_pks

    def fold_spans(self, span_pks: dict[SpanKey, int]) -> None:
        """Move each run's totals by what this batch changed in its effective spans; project tool calls;
        tell ``spans_projected`` receivers (inside the transaction) what changed."""
        after = {k: spans.merge_span(self.base[k], self.prior_updates[k] + self.new_updates[k])
                 if k in self.base else None for k in self.keys}
        existing_tools = {tc.span_id: tc for tc in
                          ToolCall.objects.filter(span_id__in=[s.pk for s in self.stored.values()])}
        tools_new: list[dict] = []
        tools_changed: list[ToolCall] = []
        projected: list[signals.SpanChange] = []
        listening = signals.spans_projected.has_listeners(Run)
        for key in self.keys:
            run = self.key_run.get(key)
            if run is None:
                continue
            eff, prev = after[key], self.before[key]
            if eff is not None:
                delta = [a - b for a, b in zip(spans.contribution(eff), spans.contribution(prev), strict=True)]
                if any(delta):
                    # Each count is bounded at the door; a run's sum saturates rather than overflow bigint.
                    run.add_contribution(delta, cap=BIGINT_MAX)
                run.note_used(models_=(eff.get("model"), eff.get("response_model")), providers=(eff.get("provider"),))
                if eff["kind"] in LOOP_KINDS:
                    # Only ever set: unsetting it when a late update turns a span into another kind would
                    # mean reading the run's other spans. The cost of that rare case is a run listed as
                    # looping whose page shows no loop.
                    run.has_loop = True
                if eff.get("start_time"):
                    run.note_span_start(parse_time(eff["start_time"]))
                if eff.get("tool") and eff["tool"].get("name") and eff != prev:
                    values = spans.tool_call_values(eff)
                    pk = span_pks[key]
                    if pk in existing_tools:
                        tc = existing_tools[pk]
                        for k, v in values.items():
                            setattr(tc, k, v)
                        tools_changed.append(tc)
                    else:
                        tools_new.append({"project_id": self.project_id, "run_id": run.pk, "span_id": pk, **values})
                if listening and eff != prev:
                    projected.append(signals.SpanChange(run=run, span_pk=span_pks[key], span_id=key[1],
                                                        before=prev, after=eff))
            run.last_span_at = self.now
            self.dirty.add(run.run_id)
        insert_rows(ToolCall, tools_new)
        if tools_changed:
            ToolCall.objects.bulk_update(tools_changed, ["name", "call_id", "arguments", "result", "status",
                                                         "latency_ms", "error", "started_at"])
        self.projected = projected

    def link_runs(self) -> None:
        """Links between runs, in both arrival orders (a child may name its parent before it exists)."""
        if self.parent_refs:
            parents = dict(Run.objects.filter(project_id=self.project_id, run_id__in=set(self.parent_refs.values()))
                           .values_list("run_id", "pk"))
            for run_id, ref in self.parent_refs.items():
                self.runs[run_id].parent_run_id = parents.get(ref)
        if self.created_runs:
            run_ids = list(self.runs)
            waiting = list(Run.objects.filter(project_id=self.project_id, parent_run_ref__any_of=run_ids,
                                              parent_run__isnull=True).exclude(run_id__any_of=run_ids))
            for child in waiting:
                child.parent_run_id = self.runs[child.parent_run_ref].pk
            Run.objects.bulk_update(waiting, ["parent_run"])

    def tell_listeners(self) -> None:
        """``spans_projected``: the spans this application changed, and the runs whose attribution
        changed (runs that existed before it), as they stand once every record is applied (a receiver
        may move a run's cost; ``settle_runs`` saves it)."""
        if signals.spans_projected.has_listeners(Run):
            created = set(self.created_runs)
            reattributed = [run for run_id, run in self.runs.items()
                            if run_id not in created and run.attribution != self.attribution[run_id]]
            if self.projected or reattributed:
                signals.spans_projected.send(sender=Run, project_id=self.project_id, changes=self.projected,
                                             reattributed=reattributed, at_end=self.at_end.append)

    def settle_runs(self) -> None:
        """Derived run fields (duration, a derived outcome, the failing span), then save the runs."""
        dirty = [self.runs[r] for r in self.dirty]
        failing = failing_spans([run.pk for run in dirty if run.needs_failing_span])
        for run in dirty:
            run.settle(failing.get(run.pk))
            run.updated_at = self.now
            self.changes.runs[run.pk] = run
        if dirty:
            update_objects(Run, dirty, RUN_FIELDS)


# Every field of Run the projection may change (written with one UPDATE per 500 runs on PostgreSQL).
RUN_FIELDS = ["agent_name", "agent_version", "end_user", "api_key", "session_id", "parent_run", "parent_run_ref",
              "status", "start_received", "started_at", "ended_at", "duration_ms", "input", "output", "metadata",
              "models_used", "providers_used", *TOKEN_FIELDS, "error_code", "error_details", "failing_span_id",
              "span_count", "error_span_count", "last_span_at", "derive_status", "has_loop", "cost_usd", "updated_at"]


def failing_spans(run_pks: list[int]) -> dict[int, str]:
    """Per run, the latest error span that no retry or fallback recovered ('' if none). Three queries
    for all the runs together (the spans that matter, their late updates, the spans only updates name)."""
    if not run_pks:
        return {}
    by_run: dict[int, dict[str, Span]] = defaultdict(dict)
    for s in Span.objects.filter(run_id__in=run_pks).filter(Q(status="error") | ~Q(retry_of="") | ~Q(fallback_of="")):
        by_run[s.run_id][s.span_id] = s
    updates: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for run_pk, span_id, fields in (SpanUpdate.objects.filter(run_id__in=run_pks).order_by("id")
                                    .values_list("run_id", "span_id", "fields")):
        updates[(run_pk, span_id)].append(fields)
    unseen = {(r, sid) for r, sid in updates if sid not in by_run[r]}
    if unseen:
        for s in Span.objects.filter(run_id__in={r for r, _ in unseen}, span_id__in={sid for _, sid in unseen}):
            if (s.run_id, s.span_id) in unseen:
                by_run[s.run_id][s.span_id] = s
    out = {}
    for run_pk in run_pks:
        eff = {sid: spans.merge_span(spans.span_to_record(s), updates.get((run_pk, sid), []))
               for sid, s in by_run[run_pk].items()}
        recovered = {e.get("retry_of") or e.get("fallback_of") for e in eff.values()
                     if (e.get("retry_of") or e.get("fallback_of")) and e.get("status") != "error"}
        failed = [e for sid, e in eff.items() if e.get("status") == "error" and sid not in recovered]
        # A failed root only reports what failed inside it: name the inner error when there is one.
        failed = [e for e in failed if e.get("parent_span_id")] or failed
        out[run_pk] = max(failed, key=lambda e: (e.get("end_time") or e["start_time"]))["span_id"] if failed else ""
    return out
