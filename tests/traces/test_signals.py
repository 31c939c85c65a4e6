"""What the run log tells the apps above it: ``spans_projected`` inside the projection's transaction
(exact, for rollups), ``run_changed`` / ``run_finished`` after commit."""
import pytest

from apps.traces import signals
from apps.traces.models import DeadRecord, Run, Span

from .helpers import accept, at, drain, finish, span, start, update

pytestmark = pytest.mark.django_db


@pytest.fixture
def key(project, make_key):
    return make_key(project)[0]


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

    signals.spans_projected.connect(broken, sender=Run, weak=False)
    try:
        accept(project, key, [start("r2"), span("r2", span_id="s1")])
        drain()
    finally:
        signals.spans_projected.disconnect(broken, sender=Run)
    assert not Span.objects.filter(span_id="s1").exists()
    assert DeadRecord.objects.filter(op="span", error__contains="rollup bug").exists()
