"""Shapes of the run log API.

Writes are validated by ``records.py`` (it names the exact field at fault and runs for every span);
the ``*In`` serializers here only describe those bodies in the OpenAPI schema, with the record
contract's limits (``records.MAX_CHARS``). Reads use the output serializers below.
"""
from __future__ import annotations

import json

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .models import TOKEN_FIELDS, Run, SpanKind, SpanStatus
from .records import MAX_CHARS, MAX_SPANS_PER_REQUEST, RUN_FINISH_STATUSES, RUN_START_STATUSES
from .selectors import SESSION_TOKENS, run_usage

# ?metadata=key:value pairs: each is one more condition on the run list's query, so a few at most.
METADATA_FILTER_MAX_PAIRS = 10
METADATA_FILTER_MAX_CHARS = 500

# --- request bodies (schema only) ------------------------------------------------------------------


class AgentIn(serializers.Serializer):
    name = serializers.CharField(max_length=MAX_CHARS["agent_name"])
    version = serializers.CharField(max_length=MAX_CHARS["agent_version"], required=False)


class RunStartIn(serializers.Serializer):
    run_id = serializers.CharField(required=False, max_length=MAX_CHARS["run_id"],
                                   help_text="Your own id; assigned if absent.")
    agent = AgentIn(required=False, help_text="An object, or just the agent's name as a string.")
    input = serializers.JSONField(required=False)
    end_user = serializers.CharField(required=False, max_length=MAX_CHARS["end_user"],
                                     help_text="Who asked for this run.")
    session_id = serializers.CharField(required=False, max_length=MAX_CHARS["session_id"])
    parent_run_id = serializers.CharField(required=False, max_length=MAX_CHARS["parent_run_id"],
                                          help_text="For a sub-agent's run.")
    metadata = serializers.DictField(required=False)
    status = serializers.ChoiceField(choices=list(RUN_START_STATUSES), required=False, default="running")
    started_at = serializers.DateTimeField(required=False, help_text="RFC 3339 with offset; default: now.")


# The usage object's keys are the token columns (one definition: models.TOKEN_FIELDS).
UsageIn = type("UsageIn", (serializers.Serializer,), {
    "__module__": __name__, **{k: serializers.IntegerField(min_value=0, required=False) for k in TOKEN_FIELDS}})


class StreamIn(serializers.Serializer):
    chunks = serializers.IntegerField(min_value=0, required=False)
    output_tokens_per_second = serializers.FloatField(min_value=0, required=False)


class ToolIn(serializers.Serializer):
    name = serializers.CharField(max_length=MAX_CHARS["tool.name"])
    call_id = serializers.CharField(max_length=MAX_CHARS["tool.call_id"], required=False)
    arguments = serializers.JSONField(required=False)
    result = serializers.JSONField(required=False)
    error = serializers.CharField(required=False)


class EventIn(serializers.Serializer):
    name = serializers.CharField()
    time = serializers.DateTimeField(required=False)
    attributes = serializers.DictField(required=False)


class SpanIn(serializers.Serializer):
    """One span. Send an object, a list of them, or ``{"spans": [...]}`` (at most
    %d per request)."""

    span_id = serializers.CharField(required=False, max_length=MAX_CHARS["span_id"],
                                    help_text="Your own id; assigned if absent.")
    parent_span_id = serializers.CharField(required=False, max_length=MAX_CHARS["span_id"])
    kind = serializers.ChoiceField(choices=SpanKind.choices, required=False,
                                   help_text="Inferred when absent (tool, llm, step or other).")
    name = serializers.CharField(required=False, max_length=MAX_CHARS["name"])
    start_time = serializers.DateTimeField(required=False, help_text="RFC 3339 with offset; default: now.")
    end_time = serializers.DateTimeField(required=False, help_text="Leave out to open the span; PATCH closes it.")
    status = serializers.ChoiceField(choices=SpanStatus.choices, required=False)
    status_message = serializers.CharField(required=False)
    error_code = serializers.CharField(required=False, max_length=MAX_CHARS["error_code"])
    retry_of = serializers.CharField(required=False, max_length=MAX_CHARS["span_id"],
                                     help_text="The span this one retries.")
    fallback_of = serializers.CharField(required=False, max_length=MAX_CHARS["span_id"],
                                        help_text="The span this one replaces.")
    attributes = serializers.DictField(required=False, help_text="Free map, kept verbatim.")
    events = EventIn(many=True, required=False)
    component = serializers.CharField(required=False, max_length=MAX_CHARS["component"])
    action = serializers.CharField(required=False, max_length=MAX_CHARS["action"])
    details = serializers.JSONField(required=False)
    provider = serializers.CharField(required=False, max_length=MAX_CHARS["provider"])
    model = serializers.CharField(required=False, max_length=MAX_CHARS["model"])
    response_model = serializers.CharField(required=False, max_length=MAX_CHARS["response_model"])
    endpoint = serializers.CharField(required=False, max_length=MAX_CHARS["endpoint"])
    usage = UsageIn(required=False, help_text="input_tokens counts the whole prompt, cached tokens included "
                                                "(the GenAI conventions'; a count below the cache tokens is "
                                                "taken as excluding them, Anthropic's).")
    cost_usd = serializers.DecimalField(required=False, max_digits=16, decimal_places=9, min_value=0,
                                        help_text="What the call cost, if you know it (USD). Recorded as a "
                                                  "reported cost, compared with what the tokens would cost.")
    time_to_first_token_ms = serializers.FloatField(required=False, min_value=0)
    stream = StreamIn(required=False)
    input_messages = serializers.JSONField(required=False)
    output_messages = serializers.JSONField(required=False)
    tool = ToolIn(required=False)


SpanIn.__doc__ = SpanIn.__doc__ % MAX_SPANS_PER_REQUEST


class RunFinishIn(serializers.Serializer):
    status = serializers.ChoiceField(choices=list(RUN_FINISH_STATUSES), required=False, default="completed")
    output = serializers.JSONField(required=False)
    error_code = serializers.CharField(required=False, max_length=MAX_CHARS["error_code"])
    error_details = serializers.DictField(required=False)
    failing_span_id = serializers.CharField(required=False, max_length=MAX_CHARS["span_id"])
    ended_at = serializers.DateTimeField(required=False)


# --- answers to writes ----------------------------------------------------------------------------


class RunAcceptedOut(serializers.Serializer):
    run_id = serializers.CharField()
    trace_id = serializers.CharField()
    batch_id = serializers.UUIDField(help_text="The durable inbox batch holding this write.")


class SpansAcceptedOut(serializers.Serializer):
    run_id = serializers.CharField()
    span_ids = serializers.ListField(child=serializers.CharField())
    batch_id = serializers.UUIDField()


class SpanUpdateAcceptedOut(serializers.Serializer):
    run_id = serializers.CharField()
    span_id = serializers.CharField()
    batch_id = serializers.UUIDField()


class RunFinishAcceptedOut(serializers.Serializer):
    run_id = serializers.CharField()
    status = serializers.CharField()
    batch_id = serializers.UUIDField()


# --- reads ------------------------------------------------------------------------------------------


class RunFilterSerializer(serializers.Serializer):
    """Query parameters of GET /runs."""

    project = serializers.SlugField(required=False, help_text="A project slug (people who see several).")
    status = serializers.CharField(required=False, help_text="One status or several, comma-separated.")
    agent = serializers.CharField(required=False, max_length=MAX_CHARS["agent_name"])
    agent_version = serializers.CharField(required=False, max_length=MAX_CHARS["agent_version"])
    end_user = serializers.CharField(required=False, max_length=MAX_CHARS["end_user"])
    session_id = serializers.CharField(required=False, max_length=MAX_CHARS["session_id"])
    model = serializers.CharField(required=False, max_length=MAX_CHARS["model"],
                                  help_text="Requested or responding model.")
    provider = serializers.CharField(required=False, max_length=MAX_CHARS["provider"])
    started_after = serializers.DateTimeField(required=False)
    started_before = serializers.DateTimeField(required=False)
    has_error = serializers.BooleanField(required=False, allow_null=True, default=None,
                                         help_text="Failed, or holding an error span.")
    has_loop = serializers.BooleanField(required=False, allow_null=True, default=None,
                                        help_text="Holding a loop (a span of kind loop, loop.iteration or loop.move).")
    metadata = serializers.ListField(
        child=serializers.CharField(max_length=METADATA_FILTER_MAX_CHARS), required=False,
        max_length=METADATA_FILTER_MAX_PAIRS,
        help_text="key:value, repeatable (?metadata=channel:web&metadata=tier:gold): runs whose metadata holds "
                  "the string value at that key, for every pair. The key ends at the first colon.")
    q = serializers.CharField(required=False, max_length=200, help_text="Text in the run's input.")

    def validate_metadata(self, value: list[str]) -> list[tuple[str, str]]:
        pairs = []
        for item in value:
            key, colon, text = item.partition(":")
            if not colon or not key:
                raise serializers.ValidationError(f"{item[:50]!r} is not key:value.")
            pairs.append((key, text))
        return pairs

    def validate_status(self, value: str) -> list[str]:
        statuses = [s.strip() for s in value.split(",") if s.strip()]
        unknown = [s for s in statuses if s not in Run.Status.values]
        if unknown:
            raise serializers.ValidationError(f"unknown status {unknown[0]!r}; one of {', '.join(Run.Status.values)}.")
        return statuses


class AgentFilterSerializer(serializers.Serializer):
    """Query parameters of GET /agents."""

    project = serializers.SlugField(required=False, help_text="A project slug (people who see several).")
    since = serializers.DateTimeField(required=False, help_text="Runs started at or after; default: 7 days ago.")
    until = serializers.DateTimeField(required=False, help_text="Runs started before; default: no end.")


UsageOut = type("UsageOut", (serializers.Serializer,), {
    "__module__": __name__, **{k: serializers.IntegerField() for k in (*TOKEN_FIELDS, "total_tokens")}})


class ApiKeyRefOut(serializers.Serializer):
    prefix = serializers.CharField(help_text="As the key list shows it (cp_live_…); never the secret.")
    name = serializers.CharField()


class RunOut(serializers.Serializer):
    """A run in a list: everything but its full input, output and spans."""

    id = serializers.CharField(source="run_id")
    project = serializers.CharField(source="project.slug")
    trace_id = serializers.CharField()
    agent = serializers.SerializerMethodField()
    end_user = serializers.CharField()
    session_id = serializers.CharField()
    parent_run_id = serializers.CharField(source="parent_run_ref")
    status = serializers.ChoiceField(choices=Run.Status.choices)
    started_at = serializers.DateTimeField()
    ended_at = serializers.DateTimeField(allow_null=True)
    duration_ms = serializers.FloatField(allow_null=True)
    input_preview = serializers.SerializerMethodField()
    models_used = serializers.ListField(child=serializers.CharField())
    providers_used = serializers.ListField(child=serializers.CharField())
    usage = serializers.SerializerMethodField()
    cost_usd = serializers.DecimalField(max_digits=20, decimal_places=9, allow_null=True,
                                        help_text="The run's own cost (its spans'), not its child runs'.")
    error_code = serializers.CharField()
    failing_span_id = serializers.CharField()
    span_count = serializers.IntegerField()
    error_span_count = serializers.IntegerField()
    last_span_at = serializers.DateTimeField(allow_null=True)
    api_key = serializers.SerializerMethodField(help_text="The key that started the run (null: none, or revoked "
                                                          "and deleted since).")
    has_loop = serializers.BooleanField()
    cache_hit_rate = serializers.FloatField(allow_null=True, help_text="Cache reads over the prompt tokens (0..1); "
                                                                       "null without a prompt.")

    def get_agent(self, run) -> AgentIn:
        return {"name": run.agent_name, "version": run.agent_version}

    @extend_schema_field(ApiKeyRefOut(allow_null=True))
    def get_api_key(self, run) -> dict | None:
        key = run.api_key
        return {"prefix": key.display_prefix, "name": key.name} if key is not None else None

    def get_input_preview(self, run) -> str:
        if run.input is None:
            return ""
        text = run.input if isinstance(run.input, str) else json.dumps(run.input, ensure_ascii=False)
        return text[:200]

    def get_usage(self, run) -> UsageOut:
        return run_usage(run)


class ToolCallOut(serializers.Serializer):
    span_id = serializers.CharField()
    name = serializers.CharField()
    call_id = serializers.CharField()
    arguments = serializers.JSONField()
    result = serializers.JSONField()
    status = serializers.CharField()
    latency_ms = serializers.FloatField(allow_null=True)
    error = serializers.CharField()
    started_at = serializers.DateTimeField()


class RecoveryOut(serializers.Serializer):
    span_id = serializers.CharField()
    via = serializers.ChoiceField(choices=["retry", "fallback"])
    status = serializers.CharField(required=False)
    error_code = serializers.CharField(required=False)
    status_message = serializers.CharField(required=False)


class SpanOut(serializers.Serializer):
    """A span as it stands now (its late updates merged), in tree order."""

    span_id = serializers.CharField()
    parent_span_id = serializers.CharField(allow_null=True)
    depth = serializers.IntegerField()
    children = serializers.ListField(child=serializers.CharField())
    kind = serializers.ChoiceField(choices=SpanKind.choices)
    name = serializers.CharField()
    start_time = serializers.DateTimeField()
    end_time = serializers.DateTimeField(allow_null=True)
    duration_ms = serializers.FloatField(allow_null=True)
    status = serializers.ChoiceField(choices=SpanStatus.choices)
    status_message = serializers.CharField()
    error_code = serializers.CharField()
    retry_of = serializers.CharField(allow_null=True)
    fallback_of = serializers.CharField(allow_null=True)
    recovers = RecoveryOut(required=False, help_text="The failed span this retry/fallback answers, and its error.")
    recovered_by = RecoveryOut(required=False)
    component = serializers.CharField()
    action = serializers.CharField()
    details = serializers.JSONField(allow_null=True)
    provider = serializers.CharField()
    model = serializers.CharField()
    response_model = serializers.CharField()
    endpoint = serializers.CharField()
    usage = UsageIn(allow_null=True)
    cost_usd = serializers.CharField(allow_null=True, help_text="The cost the producer reported (USD), if any.")
    time_to_first_token_ms = serializers.FloatField(allow_null=True)
    stream = StreamIn(allow_null=True)
    input_messages = serializers.JSONField(allow_null=True)
    output_messages = serializers.JSONField(allow_null=True)
    tool = ToolIn(allow_null=True)
    attributes = serializers.DictField()
    events = EventIn(many=True)
    updated = serializers.BooleanField(help_text="True when a late update changed this span.")


class LoopNodeOut(serializers.Serializer):
    """One iteration of a loop."""

    index = serializers.IntegerField()
    span_id = serializers.CharField()
    name = serializers.CharField()
    parent_index = serializers.IntegerField(allow_null=True)
    group_id = serializers.JSONField(allow_null=True)
    placement = serializers.JSONField(allow_null=True)
    agent_run = serializers.JSONField(allow_null=True)
    valid = serializers.BooleanField(allow_null=True, help_text="The verdict: was this attempt valid.")
    score = serializers.FloatField(allow_null=True)
    cost_usd = serializers.FloatField(allow_null=True)
    duration_ms = serializers.FloatField(allow_null=True)
    tokens_in = serializers.IntegerField(allow_null=True, help_text="As sent, else summed over its model calls.")
    tokens_out = serializers.IntegerField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    output_preview = serializers.CharField(allow_null=True)
    status = serializers.ChoiceField(choices=SpanStatus.choices)
    winner = serializers.BooleanField()


class LoopEdgeOut(serializers.Serializer):
    """One move: from its parent iteration (null: the loop's start) to the iterations it produced."""

    span_id = serializers.CharField(allow_null=True, help_text="The loop.move span; null when inferred.")
    kind = serializers.CharField(help_text="refine | fanout | stop (as sent).")
    round = serializers.IntegerField()
    rationale = serializers.JSONField(allow_null=True)
    parent_index = serializers.IntegerField(allow_null=True)
    child_indices = serializers.ListField(child=serializers.IntegerField())
    inferred = serializers.BooleanField()


class LoopOut(serializers.Serializer):
    span_id = serializers.CharField(allow_null=True, help_text="The loop span; null for iterations without one.")
    name = serializers.CharField(allow_null=True)
    driver = serializers.JSONField(allow_null=True)
    winner_index = serializers.IntegerField(allow_null=True)
    total_cost_usd = serializers.FloatField(allow_null=True)
    duration_ms = serializers.FloatField(allow_null=True)
    declared_iterations = serializers.IntegerField(allow_null=True)
    inferred = serializers.BooleanField(help_text="True when no move spans came and the edges were inferred.")
    nodes = LoopNodeOut(many=True)
    edges = LoopEdgeOut(many=True)


class TopologyOut(serializers.Serializer):
    loops = LoopOut(many=True)


class RunDetailOut(RunOut):
    input = serializers.JSONField()
    output = serializers.JSONField()
    metadata = serializers.DictField()
    error_details = serializers.JSONField()
    child_run_ids = serializers.ListField(child=serializers.CharField())
    spans = SpanOut(many=True)
    tool_calls = ToolCallOut(many=True)
    topology = TopologyOut(help_text="The run's loops as graphs (empty when it has none).")


# --- agents and sessions ---------------------------------------------------------------------------


class ErrorCountOut(serializers.Serializer):
    error_code = serializers.CharField()
    count = serializers.IntegerField()


class AgentStatsOut(serializers.Serializer):
    """One agent version's runs in the window (``selectors.agent_stats``)."""

    project = serializers.CharField()
    agent_name = serializers.CharField()
    agent_version = serializers.CharField()
    runs = serializers.IntegerField()
    completed = serializers.IntegerField()
    failed = serializers.IntegerField(help_text="Failed or lost.")
    success_rate = serializers.FloatField(allow_null=True, help_text="completed / (completed + failed); null "
                                                                     "while none has finished either way.")
    p50_ms = serializers.FloatField(allow_null=True, help_text="Median duration of the finished runs.")
    p95_ms = serializers.FloatField(allow_null=True)
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cache_hit_rate = serializers.FloatField(allow_null=True)
    first_started_at = serializers.DateTimeField(help_text="This version's first run in the window.")
    last_started_at = serializers.DateTimeField()
    top_errors = ErrorCountOut(many=True, help_text="The 3 most common error codes.")


class AgentListOut(serializers.Serializer):
    since = serializers.DateTimeField()
    until = serializers.DateTimeField(allow_null=True)
    results = AgentStatsOut(many=True)


SessionTokensOut = type("SessionTokensOut", (serializers.Serializer,), {
    "__module__": __name__, **{k: serializers.IntegerField() for k in SESSION_TOKENS}})


class SessionTotalsOut(SessionTokensOut):
    cache_hit_rate = serializers.FloatField(allow_null=True)


class TurnOut(serializers.Serializer):
    """One run of the session."""

    run_id = serializers.CharField()
    agent = AgentIn()
    status = serializers.ChoiceField(choices=Run.Status.choices)
    started_at = serializers.DateTimeField()
    ended_at = serializers.DateTimeField(allow_null=True)
    offset_ms = serializers.FloatField(help_text="From the session's first turn's start.")
    duration_ms = serializers.FloatField(allow_null=True)
    tool_calls = serializers.IntegerField()
    tokens = SessionTokensOut()
    cache_hit_rate = serializers.FloatField(allow_null=True)
    cumulative = SessionTotalsOut(help_text="The session's totals up to and including this turn.")


class SessionOut(serializers.Serializer):
    session_id = serializers.CharField()
    project = serializers.CharField()
    started_at = serializers.DateTimeField()
    span_ms = serializers.FloatField(help_text="From the first turn's start to the latest end known.")
    turn_count = serializers.IntegerField()
    truncated = serializers.BooleanField(help_text="True when the session has more than max_turns runs: "
                                                   "the first max_turns are shown.")
    max_turns = serializers.IntegerField()
    totals = SessionTotalsOut()
    turns = TurnOut(many=True)


class SessionToolCallOut(ToolCallOut):
    project = serializers.CharField(source="project.slug")
    run_id = serializers.CharField(source="run.run_id")
    span_id = serializers.CharField(source="span.span_id")
