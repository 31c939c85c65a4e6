"""The run log's write path below the API: durable accept, projection, idempotence, order independence."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DatabaseError, connection, transaction
from django.test.utils import override_settings

from apps.common.errors import ApiError
from apps.traces import inbox, live, services
from apps.traces.models import IngestBatch, Run, Span, SpanUpdate, ToolCall

from .helpers import accept, at, drain, finish, span, start, update

pytestmark = pytest.mark.django_db


@pytest.fixture
def key(project, make_key):
    return make_key(project)[0]


def agent_run(run_id="r1"):
    """An agent run: a step, a model call with cache and reasoning tokens, a tool call that fails, its
    retry, then a fallback to another model."""
    return [
        start(run_id, agent={"name": "support-bot", "version": "1.2"}, input={"question": "Where is my order?"},
              end_user="user-42", session_id="sess-1", metadata={"channel": "web"}),
        span(run_id, span_id="root", kind="agent", name="support-bot", start_time=at(0), end_time=at(50),
             status="ok"),
        span(run_id, span_id="plan", parent_span_id="root", kind="step", component="planner", action="plan",
             details={"steps": 2}, start_time=at(1), end_time=at(2), status="ok"),
        span(run_id, span_id="llm1", parent_span_id="root", kind="llm", provider="openai", model="gpt-4o",
             response_model="gpt-4o-2024-08-06", start_time=at(2), end_time=at(5), status="ok",
             usage={"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 1000, "reasoning_tokens": 50},
             time_to_first_token_ms=420.5, stream={"chunks": 31, "output_tokens_per_second": 95.2},
             input_messages=[{"role": "user", "content": "Where is my order?"}],
             output_messages=[{"role": "assistant", "tool_calls": [{"name": "lookup_order"}]}]),
        span(run_id, span_id="tool1", parent_span_id="root", kind="tool", start_time=at(5), end_time=at(6),
             status="error", status_message="timeout", error_code="tool_timeout",
             tool={"name": "lookup_order", "call_id": "call_1", "arguments": {"order": "A-1"}}),
        span(run_id, span_id="tool2", parent_span_id="root", kind="tool", start_time=at(6), end_time=at(7),
             status="ok", retry_of="tool1",
             tool={"name": "lookup_order", "call_id": "call_2", "arguments": {"order": "A-1"},
                   "result": {"status": "shipped"}}),
        span(run_id, span_id="llm2", parent_span_id="root", kind="llm", provider="openai", model="gpt-4o",
             start_time=at(7), end_time=at(9), status="error", status_message="rate limited",
             error_code="rate_limited"),
        span(run_id, span_id="llm3", parent_span_id="root", kind="llm", provider="anthropic",
             model="claude-sonnet-4", fallback_of="llm2", start_time=at(9), end_time=at(12), status="ok",
             usage={"input_tokens": 800, "output_tokens": 120, "cache_write_tokens": 700}),
        finish(run_id, status="completed", output={"answer": "It shipped."}),
    ]


def test_a_run_projects_with_tree_tool_calls_totals_and_end_user(project, key):
    response, replayed = accept(project, key, agent_run())
    assert not replayed and response["batch_id"]
    assert Run.objects.count() == 0  # accepted durably, not yet projected
    assert drain() == 1

    run = Run.objects.get(project=project, run_id="r1")
    assert run.status == Run.Status.COMPLETED
    assert (run.agent_name, run.agent_version, run.end_user, run.session_id) == ("support-bot", "1.2", "user-42",
                                                                                "sess-1")
    assert run.api_key_id == key.pk
    assert run.input == {"question": "Where is my order?"} and run.output == {"answer": "It shipped."}
    assert (run.input_tokens, run.output_tokens, run.cache_read_tokens, run.cache_write_tokens,
            run.reasoning_tokens) == (2000, 420, 1000, 700, 50)
    assert run.span_count == 7 and run.error_span_count == 2
    assert sorted(run.models_used) == ["claude-sonnet-4", "gpt-4o", "gpt-4o-2024-08-06"]
    assert sorted(run.providers_used) == ["anthropic", "openai"]
    assert run.duration_ms == 60_000
    assert run.failing_span_id == ""  # completed: both errors were recovered

    spans = {s.span_id: s for s in run.spans.all()}
    assert spans["llm1"].parent_span_id == "root" and spans["llm1"].time_to_first_token_ms == 420.5
    assert spans["llm1"].stream_chunks == 31 and spans["tool2"].retry_of == "tool1"
    assert spans["llm3"].fallback_of == "llm2" and spans["plan"].component == "planner"

    calls = list(run.tool_calls.order_by("started_at"))
    assert [(c.name, c.call_id, c.status) for c in calls] == [("lookup_order", "call_1", "error"),
                                                             ("lookup_order", "call_2", "ok")]
    assert calls[1].result == {"status": "shipped"} and calls[1].latency_ms == 1000
    assert calls[0].error == "timeout"

    assert run_totals(run) == services.run_totals_compute(run)
    batch = IngestBatch.objects.get()
    assert batch.status == IngestBatch.Status.DONE and batch.payload is None


def run_totals(run: Run) -> dict:
    run.refresh_from_db()
    return {
        **{f: getattr(run, f) for f in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                                        "reasoning_tokens", "span_count", "error_span_count")},
        "models_used": sorted(run.models_used), "providers_used": sorted(run.providers_used),
    }


def test_resent_spans_and_reprojected_batches_never_count_twice(project, key):
    accept(project, key, agent_run())
    drain()
    before = run_totals(Run.objects.get())
    # The agent re-sends everything (a retry after a lost response), twice, in new batches.
    accept(project, key, agent_run())
    accept(project, key, agent_run()[1:4])
    drain()
    run = Run.objects.get()
    assert run_totals(run) == before
    assert Span.objects.count() == 7 and ToolCall.objects.count() == 2


def test_a_batch_whose_worker_died_is_projected_once_after_its_lease_expires(project, key, settings):
    settings.TRACES_LEASE_SECONDS = 0
    accept(project, key, agent_run())
    claimed = inbox.claim(None, 10)  # a worker leases it ... and dies before committing anything
    assert [b.status for b in claimed] == ["processing"]
    assert drain() == 1  # the lease (0 s) has expired: another worker takes it over
    run = Run.objects.get()
    assert run.span_count == 7 and Span.objects.count() == 7
    assert IngestBatch.objects.get().attempts == 2


def test_an_unexpired_lease_is_not_taken_over(project, key, settings):
    settings.TRACES_LEASE_SECONDS = 600
    accept(project, key, agent_run())
    inbox.claim(None, 10)
    assert services.inbox_step() == 0
    assert Span.objects.count() == 0


def test_spans_before_their_run_and_updates_before_their_span_link_up(project, key):
    # Arrival order: a child run, spans, an update to a span not yet sent, the span, then the start.
    accept(project, key, [start("child", parent_run_id="r1", agent={"name": "sub-agent"})])
    accept(project, key, [span("r1", span_id="llm1", parent_span_id="root", kind="llm", model="gpt-4o",
                               provider="openai", start_time=at(2))])
    drain()
    placeholder = Run.objects.get(run_id="r1")
    assert placeholder.status == Run.Status.RUNNING and not placeholder.start_received
    assert placeholder.span_count == 1 and placeholder.started_at.isoformat() == at(2)
    assert Run.objects.get(run_id="child").parent_run_id == placeholder.pk

    accept(project, key, [update("r1", "tool1", end_time=at(6), status="ok",
                                 tool={"result": {"rows": 3}})])
    drain()
    assert placeholder.spans.count() == 1  # an update alone is kept, not counted
    assert SpanUpdate.objects.count() == 1

    accept(project, key, [span("r1", span_id="tool1", parent_span_id="root", kind="tool", start_time=at(5),
                               tool={"name": "search", "arguments": {"q": "x"}}),
                          update("r1", "llm1", end_time=at(4), status="ok",
                                 usage={"input_tokens": 10, "output_tokens": 5})])
    accept(project, key, [span("r1", span_id="root", kind="agent", name="bot", start_time=at(0)),
                          start("r1", agent={"name": "bot"}, end_user="u-1", input="hi")])
    drain()
    run = Run.objects.get(run_id="r1")
    assert run.pk == placeholder.pk and run.start_received and run.agent_name == "bot" and run.end_user == "u-1"
    assert run.started_at.isoformat() == at(0)
    assert (run.input_tokens, run.output_tokens, run.span_count) == (10, 5, 3)
    call = ToolCall.objects.get()
    assert call.result == {"rows": 3} and call.status == "ok" and call.latency_ms == 1000
    assert run_totals(run) == services.run_totals_compute(run)


def test_a_late_update_closes_a_span_without_rewriting_it(project, key):
    accept(project, key, [start("r1"), span("r1", span_id="s1", kind="llm", model="m", start_time=at(1))])
    drain()
    stored = Span.objects.values().get(span_id="s1")
    accept(project, key, [update("r1", "s1", end_time=at(3), status="error", status_message="boom",
                                 usage={"input_tokens": 7}),
                          update("r1", "s1", usage={"output_tokens": 2}, attributes={"late": True})])
    drain()
    assert Span.objects.values().get(span_id="s1") == stored  # the span row itself is untouched
    run = Run.objects.get()
    assert (run.input_tokens, run.output_tokens, run.error_span_count) == (7, 2, 1)
    # The same update sent again changes nothing.
    accept(project, key, [update("r1", "s1", usage={"output_tokens": 2})])
    drain()
    assert run_totals(run) == services.run_totals_compute(run)
    assert (run.output_tokens, run.error_span_count) == (2, 1)


def test_the_database_refuses_to_rewrite_a_span(project, key):
    accept(project, key, [span("r1", span_id="s1")])
    drain()
    with pytest.raises(DatabaseError), transaction.atomic():
        Span.objects.filter(span_id="s1").update(name="rewritten")
    with pytest.raises(DatabaseError), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE traces_span SET input_tokens = 99")
    assert Span.objects.get().name == "other"


def test_a_failed_run_names_its_unrecovered_failing_span(project, key):
    recs = agent_run()[:-1] + [
        span("r1", span_id="llm4", parent_span_id="root", kind="llm", model="gpt-4o", start_time=at(20),
             end_time=at(21), status="error", error_code="context_length_exceeded"),
        finish("r1", status="failed", error_code="llm_error", error_details={"span": "llm4", "limit": 128000}),
    ]
    accept(project, key, recs)
    drain()
    run = Run.objects.get()
    assert run.status == Run.Status.FAILED and run.failing_span_id == "llm4"
    assert run.error_code == "llm_error" and run.error_details == {"span": "llm4", "limit": 128000}


def test_idempotency_key_replays_the_first_answer_and_refuses_another_body(project, key):
    first, replayed = accept(project, key, [start("r1")], idempotency_key="k-1", response={"run_id": "r1"})
    again, replayed_again = accept(project, key, [start("r1")], idempotency_key="k-1", response={"run_id": "zz"})
    assert not replayed and replayed_again and again == first and again["run_id"] == "r1"
    with pytest.raises(ApiError) as exc:
        accept(project, key, [start("r2")], idempotency_key="k-1")
    assert exc.value.status_code == 409 and exc.value.error_code == "idempotency_conflict"
    assert IngestBatch.objects.count() == 1


def test_idempotency_keys_are_per_project(project, other_project, key, make_key):
    other_key = make_key(other_project)[0]
    accept(project, key, [start("r1")], idempotency_key="same")
    _, replayed = accept(other_project, other_key, [start("r1")], idempotency_key="same")
    assert not replayed and IngestBatch.objects.count() == 2


def test_a_poison_batch_is_dead_lettered_and_the_next_batches_still_project(project, key):
    accept(project, key, [start("r1")])
    services.batch_accept(project=project, api_key=key, source="rest", records=[{"op": "explode", "run_id": "r1"}],
                          response={})
    services.batch_accept(project=project, api_key=key, source="rest", kind="no-such-format", records=[],
                          response={})
    accept(project, key, [span("r1", span_id="s1")])
    drain()
    dead = IngestBatch.objects.filter(status="dead").order_by("id")
    assert [(b.error_code, "explode" in b.error or "no-such-format" in b.error) for b in dead] == [
        ("invalid_record", True), ("unknown_kind", True)]
    assert IngestBatch.objects.filter(status="done").count() == 2
    assert Run.objects.get().span_count == 1


def test_a_batch_that_keeps_failing_is_given_up_with_its_reason(project, key, settings):
    settings.TRACES_LEASE_SECONDS = 0
    settings.TRACES_MAX_ATTEMPTS = 2
    accept(project, key, [start("r1")])
    for _ in range(2):
        inbox.claim(None, 10)  # two workers die on it
    drain()
    batch = IngestBatch.objects.get()
    assert batch.status == "dead" and batch.error_code == "gave_up" and "2 attempts" in batch.error


def test_runs_of_two_projects_never_mix(project, other_project, key, make_key):
    other_key = make_key(other_project)[0]
    accept(project, key, [start("same-id", end_user="a"), span("same-id", span_id="s1", usage={"input_tokens": 1})])
    accept(other_project, other_key, [start("same-id", end_user="b"),
                                      span("same-id", span_id="s1", usage={"input_tokens": 5})])
    drain()
    mine, theirs = Run.objects.get(project=project), Run.objects.get(project=other_project)
    assert (mine.end_user, mine.input_tokens, theirs.end_user, theirs.input_tokens) == ("a", 1, "b", 5)


def test_projection_publishes_run_changes_on_channels_groups(project, key):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(live.project_runs_group(project.pk), channel)
    accept(project, key, [start("r1", end_user="u"), span("r1", span_id="s1")])
    drain()
    message = async_to_sync(layer.receive)(channel)
    assert message["type"] == "run.updated" and message["run"]["id"] == "r1" and message["run"]["span_count"] == 1


@override_settings(CHANNEL_LAYERS={"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                               "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}})
def test_an_unreachable_channel_layer_never_fails_projection(project, key):
    from channels.layers import channel_layers
    channel_layers.backends.clear()
    try:
        accept(project, key, [start("r1"), span("r1", span_id="s1")])
        drain()
        assert Run.objects.get().span_count == 1
    finally:
        channel_layers.backends.clear()


def test_a_claim_stops_at_the_item_limit_and_a_task_drains_claim_after_claim(project, key, settings):
    settings.TRACES_PROJECTION_ITEM_LIMIT = 5
    batches = [accept(project, key, [start(f"r{i}"), span(f"r{i}", span_id="s1"), span(f"r{i}", span_id="s2")])
               for i in range(4)]
    assert len(batches) == 4
    # 3 records per batch: one batch fills 3 of 5, a second would make 6, so each claim takes one ...
    claimed = inbox.claim(None, 10)
    assert [b.item_count for b in claimed] == [3]
    # ... but never less than one batch, however large.
    settings.TRACES_PROJECTION_ITEM_LIMIT = 1
    assert len(inbox.claim(None, 10)) == 1
    settings.TRACES_PROJECTION_ITEM_LIMIT = 6
    assert len(inbox.claim(None, 10)) == 2
    IngestBatch.objects.update(status="pending", lease_expires_at=None)
    # The task body goes on claiming until nothing is left (within its time budget).
    settings.TRACES_PROJECTION_ITEM_LIMIT = 3
    assert services.inbox_drain(budget_seconds=60) == 4
    assert IngestBatch.objects.filter(status="done").count() == 4 and Span.objects.count() == 8
    # A spent budget still projects the first claim: a task never does nothing.
    settings.TRACES_PROJECTION_ITEM_LIMIT = 1
    accept(project, key, [start("late")])
    accept(project, key, [start("later")])
    assert services.inbox_drain(budget_seconds=0) == 1
    assert services.inbox_drain(budget_seconds=0) == 1
