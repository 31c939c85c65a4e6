"""The run log: runs, spans and tool calls, and the inbox that makes every write durable first.

The log proper is append-only: a :class:`Span` is never rewritten once stored, and a late change to
it (closing an open span, a result that arrives later) is a :class:`SpanUpdate` row merged at read.
:class:`Run` totals and :class:`ToolCall` rows are a read model derived from spans and updates by the
projection (``projection``); they can be recomputed from the log (``services.run_totals_compute``).
"""
from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import models
from django.db.models import Q

from apps.projects.models import ProjectOwnedQuerySet


class SpanKind(models.TextChoices):
    AGENT = "agent"
    LLM = "llm"
    TOOL = "tool"
    RETRIEVER = "retriever"
    EMBEDDING = "embedding"
    MEMORY = "memory"
    CHAIN = "chain"
    GUARDRAIL = "guardrail"
    EVALUATOR = "evaluator"
    LOOP = "loop"
    LOOP_MOVE = "loop.move"
    LOOP_ITERATION = "loop.iteration"
    STEP = "step"
    OTHER = "other"


# The span kinds that make a run's loop graph (``topology``); a run holding one has ``has_loop``.
LOOP_KINDS = (SpanKind.LOOP, SpanKind.LOOP_ITERATION, SpanKind.LOOP_MOVE)


class SpanStatus(models.TextChoices):
    OK = "ok"
    ERROR = "error"
    UNSET = "unset"


# Money is counted in nano-USD integers wherever it is summed: a price per million tokens with up to
# three decimals (all of genai-prices' are) costs a whole number of nano-USD per token, so sums are exact.
NANOS_PER_USD = 10**9

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def cache_hit_rate(input_tokens: int | None, cache_read: int | None, cache_write: int | None) -> float | None:
    """The share of prompt tokens served from the provider's cache (0..1), or None with no prompt.

    Providers count differently: OpenAI's and the GenAI conventions' input tokens include the cached
    ones; Anthropic's exclude both the cache reads and the cache writes. A count of input tokens below
    the cache reads can only be the second kind, so the prompt is then input + cache read + cache write.
    """
    inp, read, write = input_tokens or 0, cache_read or 0, cache_write or 0
    prompt = inp if inp >= read + write and inp > 0 else inp + read + write
    return read / prompt if prompt else None


class IngestBatch(models.Model):
    """A write as it was accepted, committed before the client gets its 2xx.

    The projection leases a batch (``lease_expires_at``): a worker that dies mid-projection leaves
    the lease to expire and the sweeper hands the batch to another worker. A batch that cannot be
    projected is DEAD with its reason, never dropped. Once projected the payload is cleared; the row
    stays (for ``Idempotency-Key`` replays) until housekeeping removes it.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        PROCESSING = "processing"
        DONE = "done"
        DEAD = "dead"

    class Source(models.TextChoices):
        REST = "rest"
        OTLP = "otlp"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="ingest_batches")
    api_key = models.ForeignKey("projects.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="+")
    # The id clients see (in every 202): opaque, so it tells nothing of other projects' volume.
    public_id = models.UUIDField(default=uuid.uuid4, editable=False)
    source = models.CharField(max_length=16, choices=Source.choices)
    # The payload's format: "records" (canonical JSON records, see records.py); later ones register a decoder.
    kind = models.CharField(max_length=32, default="records")
    payload = models.JSONField(null=True, blank=True)
    raw = models.BinaryField(null=True, blank=True)
    item_count = models.PositiveIntegerField(default=0)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001 - NULL = no key (unique)
    request_hash = models.CharField(max_length=64, blank=True)
    response = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    not_before = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()  # .visible_to(principal): the one authorization path

    class Meta:
        verbose_name = "ingest batch"
        verbose_name_plural = "ingest inbox"
        constraints = [
            models.UniqueConstraint(fields=["project", "idempotency_key"], condition=Q(idempotency_key__isnull=False),
                                    name="traces_batch_idempotency_key"),
        ]
        indexes = [
            # The projection's claim query only ever looks at unfinished batches.
            models.Index(fields=["status", "id"], condition=Q(status__in=["pending", "processing"]),
                         name="traces_batch_open"),
            models.Index(fields=["project", "status", "-created_at"], name="traces_batch_project"),
            # /healthz counts the dead-lettered ones.
            models.Index(fields=["id"], condition=Q(status="dead"), name="traces_batch_dead"),
        ]

    def __str__(self) -> str:
        return f"batch {self.pk} ({self.source}, {self.status})"


class DeadRecord(models.Model):
    """One record of an accepted batch that the projection could not store, set aside so that the
    records around it were stored (the projection bisects a failing batch down to the records at fault).

    ``raw`` is the record as decoded, before redaction, as ASCII JSON bytes (escapes keep a NUL, a lone
    surrogate or an Infinity that a JSON column would refuse); it is never shown, only re-projected
    (``services.dead_record_reproject``) once the cause is fixed. ``preview`` is a redacted excerpt.
    The batch is referred to by value: housekeeping deletes projected batches, not their dead records.
    """

    class Status(models.TextChoices):
        DEAD = "dead"
        REPROJECTED = "reprojected"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey("projects.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="+")
    batch_public_id = models.UUIDField(help_text="The batch id the client was answered.")
    batch_pk = models.BigIntegerField()
    source = models.CharField(max_length=16)
    position = models.PositiveIntegerField(help_text="The record's place in its batch (0 = first).")
    op = models.CharField(max_length=16)
    run_ref = models.CharField(max_length=128, blank=True, help_text="The run id (or trace id) it names.")
    raw = models.BinaryField()
    preview = models.TextField(blank=True)
    error_code = models.CharField(max_length=64)
    error = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DEAD)
    created_at = models.DateTimeField(auto_now_add=True)
    reprojected_at = models.DateTimeField(null=True, blank=True)

    objects = ProjectOwnedQuerySet.as_manager()  # .visible_to(principal): the one authorization path

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["project", "status", "-created_at"], name="traces_deadrecord_project"),
            models.Index(fields=["status", "created_at"], name="traces_deadrecord_status"),
        ]

    def __str__(self) -> str:
        return f"dead {self.op} #{self.position} of batch {self.batch_public_id}"


# error_code of a run the housekeeping sweep declared LOST (a later span revives it).
LOST_ERROR_CODE = "run_lost"


class Run(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        LOST = "lost"
        CANCELLED = "cancelled"

    TERMINAL = (Status.COMPLETED, Status.FAILED, Status.LOST, Status.CANCELLED)

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="runs")
    run_id = models.CharField(max_length=128, help_text="The agent's own run id (or one we assigned).")
    trace_id = models.CharField(max_length=32, db_index=True)
    agent_name = models.CharField(max_length=200, blank=True)
    agent_version = models.CharField(max_length=100, blank=True)
    end_user = models.CharField(max_length=256, blank=True, help_text="Who asked for this run.")
    api_key = models.ForeignKey("projects.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="runs")
    session_id = models.CharField(max_length=256, blank=True)
    parent_run = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="child_runs")
    parent_run_ref = models.CharField(max_length=128, blank=True, help_text="The parent's run id as sent.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    start_received = models.BooleanField(default=False, help_text="False while only spans have arrived.")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    input = models.JSONField(null=True, blank=True)
    output = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    models_used = models.JSONField(default=list, blank=True)
    providers_used = models.JSONField(default=list, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(
        max_digits=20, decimal_places=9, null=True, blank=True,
        help_text="The sum of this run's spans' costs (not its child runs'), kept by the costs app as spans "
                  "are projected; empty while no span of it was priced.")
    error_code = models.CharField(max_length=100, blank=True)
    error_details = models.JSONField(null=True, blank=True)
    failing_span_id = models.CharField(max_length=64, blank=True)
    span_count = models.PositiveIntegerField(default=0)
    error_span_count = models.PositiveIntegerField(default=0)
    last_span_at = models.DateTimeField(null=True, blank=True)
    derive_status = models.BooleanField(
        default=False, help_text="Outcome inferred from the spans (OTLP): completed unless an error inside was "
                                 "never recovered, then failed with that span named.")
    has_loop = models.BooleanField(
        default=False, help_text="A span of a loop kind (loop, loop.iteration, loop.move) was seen in this run.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()  # .visible_to(principal): the one authorization path

    class Meta:
        ordering = ["-started_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "run_id"], name="traces_run_project_run_id"),
        ]
        indexes = [
            models.Index(fields=["project", "-started_at", "-id"], name="traces_run_time"),
            models.Index(fields=["project", "status", "-started_at"], name="traces_run_status"),
            models.Index(fields=["project", "agent_name", "-started_at"], name="traces_run_agent"),
            models.Index(fields=["project", "end_user", "-started_at"], name="traces_run_end_user"),
            models.Index(fields=["project", "session_id", "started_at"], name="traces_run_session"),
            # The housekeeping sweep's question: which RUNNING runs went quiet?
            models.Index(fields=["last_span_at"], condition=Q(status="running"), name="traces_run_quiet"),
            models.Index(fields=["project", "parent_run_ref"], name="traces_run_parent_ref",
                         condition=~Q(parent_run_ref="")),
            # The run list filtered to loops (?has_loop=true): few runs hold one, so a partial index
            # serves that page without walking the project's whole time index.
            models.Index(fields=["project", "-started_at", "-id"], name="traces_run_loop", condition=Q(has_loop=True)),
        ]

    def __str__(self) -> str:
        return f"{self.agent_name or 'run'} {self.run_id}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def total_tokens(self) -> int:
        return sum(getattr(self, f) for f in TOKEN_FIELDS[:2])

    @property
    def attribution(self) -> tuple[str, str, str, int]:
        """Who a run's spend and calls are attributed to: agent, version, end user, key (0: none)."""
        return self.agent_name, self.agent_version, self.end_user, self.api_key_id or 0

    @property
    def cache_hit_rate(self) -> float | None:
        return cache_hit_rate(self.input_tokens, self.cache_read_tokens, self.cache_write_tokens)

    # --- the row's invariants: what each record does to a run (the projection calls these, then saves) ---

    def add_cost(self, delta_nanos: int) -> None:
        """Move the run's cost by a span's change in cost (nano-USD: exact, see the costs app)."""
        nanos = round((self.cost_usd or Decimal(0)) * NANOS_PER_USD) + delta_nanos
        self.cost_usd = Decimal(nanos).scaleb(-9)

    def revive_if_lost(self) -> bool:
        """Declared LOST by housekeeping, yet something new came: it is alive after all."""
        if self.status == self.Status.LOST and self.error_code == LOST_ERROR_CODE:
            self.status, self.error_code, self.error_details = self.Status.RUNNING, "", None
            return True
        return False

    def fill_blanks(self, rec: dict) -> None:
        """Run fields told by a span other than the root (an OTLP ``run.start`` with ``fill``): fill
        blanks, change nothing already set."""
        for key in ("agent_name", "agent_version", "end_user", "session_id"):
            if rec.get(key) and not getattr(self, key):
                setattr(self, key, rec[key])
        if rec.get("metadata"):
            self.metadata = {**rec["metadata"], **(self.metadata or {})}

    def record_start(self, rec: dict, *, started_at, api_key_id: int | None) -> None:
        """A ``run.start`` record: its fields win over what spans told before; a terminal status stays."""
        self.start_received = True
        for key in ("agent_name", "agent_version", "end_user", "session_id"):
            setattr(self, key, rec.get(key, "") or getattr(self, key))
        if rec.get("input") is not None:
            self.input = rec["input"]
        self.metadata = {**(self.metadata or {}), **(rec.get("metadata") or {})}
        self.started_at = started_at
        if self.api_key_id is None:
            self.api_key_id = api_key_id
        if not self.is_terminal:
            self.status = rec.get("status", self.Status.RUNNING)
        if rec.get("parent_run_id"):
            self.parent_run_ref = rec["parent_run_id"]

    def record_finish(self, rec: dict, *, ended_at) -> None:
        """A ``run.finish`` record (``derive_status``: the outcome is decided from the spans, see ``settle``)."""
        self.status = rec["status"]
        self.ended_at = ended_at
        if rec.get("output") is not None:
            self.output = rec["output"]
        self.error_code = rec.get("error_code", "") or self.error_code
        if rec.get("error_details") is not None:
            self.error_details = rec["error_details"]
        if rec.get("failing_span_id"):
            self.failing_span_id = rec["failing_span_id"]
        self.derive_status = bool(rec.get("derive_status"))

    def add_contribution(self, delta, *, cap: int) -> None:
        """Move the totals by ``delta`` (token counts, spans, error spans: see ``spans.contribution``);
        each token total saturates at ``cap`` rather than overflow its column."""
        for name, d in zip(TOKEN_FIELDS, delta[:len(TOKEN_FIELDS)], strict=True):
            setattr(self, name, min(getattr(self, name) + d, cap))
        self.span_count += delta[len(TOKEN_FIELDS)]
        self.error_span_count += delta[len(TOKEN_FIELDS) + 1]

    def note_used(self, *, models_: tuple[str, ...] = (), providers: tuple[str, ...] = ()) -> bool:
        """Add models and providers not yet listed. True when something was added."""
        changed = False
        for values, bucket in ((models_, "models_used"), (providers, "providers_used")):
            for value in values:
                if value and value not in getattr(self, bucket):
                    setattr(self, bucket, [*getattr(self, bucket), value])
                    changed = True
        return changed

    def note_span_start(self, start) -> bool:
        """Until its ``run.start`` arrives, a run started when its earliest span did."""
        if not self.start_received and start < self.started_at:
            self.started_at = start
            return True
        return False

    @property
    def outcome_derived(self) -> bool:
        """Ended, with its outcome to be decided from its spans (OTLP: the root ended OK)."""
        return self.derive_status and self.status in (self.Status.COMPLETED, self.Status.FAILED)

    @property
    def needs_failing_span(self) -> bool:
        """Whether ``settle`` needs the run's latest unrecovered error span."""
        if self.outcome_derived:
            return bool(self.error_span_count)
        return self.status == self.Status.FAILED and not self.failing_span_id

    def settle(self, failing_span_id: str | None) -> None:
        """Derived fields: the duration, and the outcome of a run whose status is derived (failed if an
        error inside it was never recovered, naming that span); a failed run names its failing span."""
        if self.ended_at is not None and self.started_at is not None:
            self.duration_ms = max((self.ended_at - self.started_at).total_seconds() * 1000, 0.0)
        if self.outcome_derived:
            self.failing_span_id = failing_span_id or ""
            self.status = self.Status.FAILED if self.failing_span_id else self.Status.COMPLETED
        elif self.status == self.Status.FAILED and not self.failing_span_id:
            self.failing_span_id = failing_span_id or ""


class Span(models.Model):
    """One unit of work in a run, as it was received. Never updated; see SpanUpdate."""

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="spans")
    trace_id = models.CharField(max_length=32)
    span_id = models.CharField(max_length=64)
    parent_span_id = models.CharField(max_length=64, blank=True)
    name = models.CharField(max_length=500)
    kind = models.CharField(max_length=16, choices=SpanKind.choices, default=SpanKind.OTHER)
    start_time = models.DateTimeField()
    end_time = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=8, choices=SpanStatus.choices, default=SpanStatus.UNSET)
    status_message = models.TextField(blank=True)
    error_code = models.CharField(max_length=100, blank=True)
    retry_of = models.CharField(max_length=64, blank=True)
    fallback_of = models.CharField(max_length=64, blank=True)
    # Steps (a request tracer's timeline)
    component = models.CharField(max_length=200, blank=True)
    action = models.CharField(max_length=200, blank=True)
    details = models.JSONField(null=True, blank=True)
    # Model calls
    provider = models.CharField(max_length=100, blank=True)
    request_model = models.CharField(max_length=200, blank=True)
    response_model = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=500, blank=True)
    input_tokens = models.BigIntegerField(null=True, blank=True)
    output_tokens = models.BigIntegerField(null=True, blank=True)
    cache_read_tokens = models.BigIntegerField(null=True, blank=True)
    cache_write_tokens = models.BigIntegerField(null=True, blank=True)
    reasoning_tokens = models.BigIntegerField(null=True, blank=True)
    cost_usd = models.DecimalField(
        max_digits=16, decimal_places=9, null=True, blank=True,
        help_text="The cost the producer reported for this span (OpenInference llm.cost.total, the loop "
                  "convention's iteration cost, a REST cost_usd); what it was priced at is the costs app's.")
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    stream_chunks = models.PositiveIntegerField(null=True, blank=True)
    output_tokens_per_second = models.FloatField(null=True, blank=True)
    input_messages = models.JSONField(null=True, blank=True)
    output_messages = models.JSONField(null=True, blank=True)
    # Tool calls (also projected to ToolCall)
    tool = models.JSONField(null=True, blank=True)
    attributes = models.JSONField(default=dict, blank=True)
    events = models.JSONField(default=list, blank=True)
    batch_id = models.BigIntegerField(null=True, blank=True, help_text="The inbox batch it came in.")
    received_at = models.DateTimeField(auto_now_add=True)

    objects = ProjectOwnedQuerySet.as_manager()  # .visible_to(principal): the one authorization path

    class Meta:
        ordering = ["start_time", "id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "trace_id", "span_id"], name="traces_span_identity"),
        ]
        indexes = [
            models.Index(fields=["run", "start_time"], name="traces_span_run"),
            models.Index(fields=["project", "-start_time"], name="traces_span_time"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.span_id})"


class SpanUpdate(models.Model):
    """A late change to a span (closing it, a late result), appended and merged at read.

    Keyed by the span's identity rather than a foreign key, so an update that arrives before its
    span is kept and applies once the span comes.
    """

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="span_updates")
    trace_id = models.CharField(max_length=32)
    span_id = models.CharField(max_length=64)
    fields = models.JSONField()
    batch_id = models.BigIntegerField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    objects = ProjectOwnedQuerySet.as_manager()  # .visible_to(principal): the one authorization path

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["project", "trace_id", "span_id"], name="traces_spanupdate_span"),
            models.Index(fields=["run", "id"], name="traces_spanupdate_run"),
        ]

    def __str__(self) -> str:
        return f"update of {self.span_id}"


class ToolCall(models.Model):
    """A tool invocation, projected from a span's ``tool`` (and its updates)."""

    class Status(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        RUNNING = "running"

    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tool_calls")
    span = models.OneToOneField(Span, on_delete=models.CASCADE, related_name="tool_call")
    name = models.CharField(max_length=200)
    call_id = models.CharField(max_length=200, blank=True)
    arguments = models.JSONField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.RUNNING)
    latency_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField()

    objects = ProjectOwnedQuerySet.as_manager()  # .visible_to(principal): the one authorization path

    class Meta:
        ordering = ["started_at", "id"]
        indexes = [
            models.Index(fields=["run", "started_at"], name="traces_toolcall_run"),
            models.Index(fields=["project", "name", "-started_at"], name="traces_toolcall_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.call_id or self.span_id})"
