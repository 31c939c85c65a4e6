"""What the run log tells the apps above it: ``spans_projected`` inside the projection's transaction
(exact, for rollups), ``run_changed`` / ``run_finished`` after commit."""
from contextlib import contextmanager

import pytest

from apps.traces import signals
from apps.traces.models import DeadRecord, Run, Span

from .helpers import accept, at, drain, finish, span, start, update

pytestmark = pytest.mark.django_db


@pytest.fixture
def key(project, make_key):
    return make_key(project)[0]


@contextmanager
def listening(receiver):
    signals.spans_projected.connect(receiver, sender=Run, weak=False)
    try:
        yield
    finally:
        signals.spans_projected.disconnect(receiver, sender=Run)


def project_run(project, key, run_id: str, span_id: str) -> None:
    accept(project, key, [start(run_id), span(run_id, span_id=span_id)])
    drain()


@pytest.fixture
def received():
    got = []

    def receiver(sender, project_id, changes, **kwargs):
        got.extend((project_id, c) for c in changes)

    signals.spans_projected.connect(receiver, sender=Run, weak=False)
    yield got
    signals.spans_projected.disconnect(receiver, sender=Run)


def test_spans_projected_tells_each_span_before_and_after(project, key, received):
    accept(project, key, [start("r1"), span("r1", span_id="llm", kind="llm", usage={"input_tokens": 10})])
    drain()
    assert [(pid, c.span_id, c.before, c.after["usage"]) for pid, c in received] == [
        (project.pk, "llm", None, {"input_tokens": 10})]
    assert received[0][1].span_pk == Span.objects.get(span_id="llm").pk

    received.clear()
    accept(project, key, [update("r1", "llm", usage={"output_tokens": 5}, end_time=at(2))])
    drain()
    [(_, change)] = received
    assert change.before["usage"] == {"input_tokens": 10}
    assert change.after["usage"] == {"input_tokens": 10, "output_tokens": 5}
    assert change.run.run_id == "r1"

    received.clear()
    accept(project, key, [span("r1", span_id="llm", kind="llm", usage={"input_tokens": 999}), finish("r1")])
    drain()
    assert received == []  # a re-sent span changes nothing, so nothing is told


def test_a_receiver_that_fails_sets_the_records_aside_rather_than_store_them_untold(project, key):
    def broken(sender, **kwargs):
        raise RuntimeError("rollup bug")

    with listening(broken):
        project_run(project, key, "r2", "s1")
    assert not Span.objects.filter(span_id="s1").exists()
    assert DeadRecord.objects.filter(op="span", error__contains="rollup bug").exists()


def test_at_end_runs_last_in_the_transaction_after_the_runs_are_saved(project, key):
    seen = []

    def receiver(sender, changes, at_end, **kwargs):
        for c in changes:
            c.run.add_cost(7)

        def last():  # the run row already holds what the projection saved, and nothing is committed yet
            run = Run.objects.get(run_id="r3")
            seen.append((run.span_count, run.cost_usd, Span.objects.filter(span_id="s1").exists()))
        at_end(last)

    with listening(receiver):
        project_run(project, key, "r3", "s1")
    assert seen == [(1, Run.objects.get(run_id="r3").cost_usd, True)]
    assert Run.objects.get(run_id="r3").cost_usd * 10**9 == 7


def test_a_failing_last_write_fails_the_group_like_any_receiver(project, key):
    def receiver(sender, at_end, **kwargs):
        def last():
            raise RuntimeError("rollup upsert bug")
        at_end(last)

    with listening(receiver):
        project_run(project, key, "r4", "s9")
    assert not Span.objects.filter(span_id="s9").exists()
    assert DeadRecord.objects.filter(op="span", error__contains="rollup upsert bug").exists()
