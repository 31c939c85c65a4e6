"""Housekeeping (beat): quiet RUNNING runs become LOST, and runs past their project's retention are
deleted with everything of theirs, in bounded chunks, audited."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.traces import housekeeping, services, signals
from apps.traces.models import DeadRecord, IngestBatch, Run, Span, SpanUpdate, ToolCall

from .helpers import accept, at, drain, finish, span, start, update
from .workers import purge_queue, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.django_db

LATER = timedelta(minutes=6)  # past the default 5 minutes


@pytest.fixture
def key(project, make_key):
    return make_key(project)[0]


@pytest.fixture
def finished_runs():
    seen: list[tuple[str, str]] = []

    def receiver(sender, run, **kwargs):
        seen.append((run.run_id, run.status))

    signals.run_finished.connect(receiver)
    yield seen
    signals.run_finished.disconnect(receiver)


def _tool_run(run_id: str, **start_kw) -> list[dict]:
    return [
        start(run_id, **start_kw),
        span(run_id, span_id="llm", kind="llm", model="m", start_time=at(1), end_time=at(2),
             usage={"input_tokens": 5, "output_tokens": 7}),
        span(run_id, span_id="tool", kind="tool", start_time=at(2), tool={"name": "search", "arguments": {"q": 1}}),
        update(run_id, "tool", end_time=at(3), status="ok"),
    ]


# --- LOST -------------------------------------------------------------------------------------------

def test_a_quiet_running_run_becomes_lost_and_the_others_do_not(project, key, finished_runs):
    accept(project, key, _tool_run("quiet") + _tool_run("done") + [finish("done", status="completed")])
    drain()
    now = timezone.now()
    assert housekeeping.runs_mark_lost(now=now + timedelta(minutes=4)) == 0  # not yet 5 minutes

    accept(project, key, [span("busy", span_id="b1", start_time=at(0))])
    drain()
    # Six minutes on, "busy" had its last span a minute before:
    Run.objects.filter(run_id="busy").update(last_span_at=now + timedelta(minutes=5))
    assert housekeeping.runs_mark_lost(now=now + LATER) == 1

    quiet = Run.objects.get(run_id="quiet")
    assert quiet.status == "lost" and quiet.error_code == "run_lost"
    assert quiet.error_details["message"] == "no new span for 5 minutes"
    assert quiet.error_details["last_activity_at"] == quiet.last_span_at.isoformat()
    assert Run.objects.get(run_id="done").status == "completed"
    assert Run.objects.get(run_id="busy").status == "running"
    assert finished_runs == [("done", "completed"), ("quiet", "lost")]
    # Nothing else is quiet: a second pass changes nothing.
    assert housekeeping.runs_mark_lost(now=now + LATER) == 0


def test_the_setting_decides_how_quiet_is_lost(project, key, settings):
    settings.TRACES_LOST_AFTER_MINUTES = 30
    accept(project, key, _tool_run("r1"))
    drain()
    assert housekeeping.runs_mark_lost(now=timezone.now() + LATER) == 0
    assert housekeeping.runs_mark_lost(now=timezone.now() + timedelta(minutes=31)) == 1


def test_a_run_that_only_started_is_lost_from_its_start(project, key):
    accept(project, key, [start("no-spans")])
    drain()
    assert Run.objects.get().last_span_at is None
    assert housekeeping.runs_mark_lost(now=timezone.now() + LATER) == 1
    assert Run.objects.get().status == "lost"


def test_a_backlog_in_the_inbox_never_makes_a_live_run_look_lost(project, key):
    accept(project, key, _tool_run("r1"))
    drain()
    # Its next span was accepted but the projection is behind: the run is not quiet.
    accept(project, key, [span("r1", span_id="later", start_time=at(10))])
    assert housekeeping.runs_mark_lost(now=timezone.now() + LATER) == 0
    assert Run.objects.get().status == "running"
    drain()
    assert housekeeping.runs_mark_lost(now=timezone.now() + LATER) == 1


def test_a_span_after_lost_revives_the_run_and_a_finish_settles_it(project, key, finished_runs):
    accept(project, key, _tool_run("r1"))
    drain()
    housekeeping.runs_mark_lost(now=timezone.now() + LATER)
    assert Run.objects.get().status == "lost"

    # A re-sent span it already had is no sign of life.
    accept(project, key, [span("r1", span_id="llm", kind="llm", model="m", start_time=at(1), end_time=at(2),
                                usage={"input_tokens": 5, "output_tokens": 7})])
    drain()
    assert Run.objects.get().status == "lost"

    accept(project, key, [span("r1", span_id="new", start_time=at(400))])
    drain()
    run = Run.objects.get()
    assert (run.status, run.error_code, run.error_details) == ("running", "", None)
    assert run.span_count == 3 and run.input_tokens == 5

    housekeeping.runs_mark_lost(now=timezone.now() + LATER)
    accept(project, key, [finish("r1", status="completed", output={"ok": True})])
    drain()
    run = Run.objects.get()
    assert run.status == "completed" and run.output == {"ok": True}
    assert finished_runs == [("r1", "lost"), ("r1", "lost"), ("r1", "completed")]


def test_only_the_sweep_s_verdict_is_undone_by_a_late_span(project, key):
    accept(project, key, [start("r1"), finish("r1", status="cancelled", error_code="user_cancelled")])
    drain()
    accept(project, key, [span("r1", span_id="late", start_time=at(5))])
    drain()
    run = Run.objects.get()
    assert run.status == "cancelled" and run.error_code == "user_cancelled"


# --- Retention --------------------------------------------------------------------------------------

def _age(run_ids, days: float) -> None:
    then = timezone.now() - timedelta(days=days)
    Run.objects.filter(run_id__in=run_ids).update(started_at=then, updated_at=then)


def _one_expired_run(project, key) -> None:
    """Run "old" (two spans, one tool call, one span update), three days old, in a one-day project."""
    project.retention_days = 1
    project.save()
    accept(project, key, _tool_run("old"))
    drain()
    _age(["old"], days=3)


def _counts(project) -> dict[str, int]:
    return {"runs": Run.objects.filter(project=project).count(),
            "spans": Span.objects.filter(project=project).count(),
            "span_updates": SpanUpdate.objects.filter(project=project).count(),
            "tool_calls": ToolCall.objects.filter(project=project).count()}


def test_runs_past_retention_go_with_everything_of_theirs_and_it_is_audited(project, other_project, key,
                                                                            make_key):
    project.retention_days = 30
    project.save()
    accept(project, key, _tool_run("old-1") + _tool_run("old-2") + _tool_run("active") + _tool_run("new")
           + [start("child", parent_run_id="old-1")])
    other_key = make_key(other_project)[0]
    accept(other_project, other_key, _tool_run("other-old"))
    drain()
    _age(["old-1", "old-2", "child", "other-old"], days=40)
    # Started long ago but still changing (a span a day ago): kept.
    Run.objects.filter(run_id="active").update(started_at=timezone.now() - timedelta(days=40),
                                               updated_at=timezone.now() - timedelta(days=1))
    before = _counts(project)

    deleted = housekeeping.runs_purge_expired(chunk_rows=2)

    assert deleted == {"runs": 3, "spans": 4, "span_updates": 2, "tool_calls": 2}
    after = _counts(project)
    assert {k: before[k] - after[k] for k in before} == deleted
    assert set(Run.objects.filter(project=project).values_list("run_id", flat=True)) == {"active", "new"}
    assert not Span.objects.filter(run__run_id__in=["old-1", "old-2"]).exists()
    # Another project without retention keeps its old run.
    assert Run.objects.filter(project=other_project, run_id="other-old").exists()
    # One audit event per chunk, written in the chunk's transaction: together they tell every deletion.
    events = list(AuditEvent.objects.filter(action="traces.retention_purged").order_by("seq"))
    assert len(events) > 1
    assert all(e.project_slug == project.slug and e.actor_type == "system" for e in events)
    assert all(e.after["retention_days"] == 30 for e in events)
    assert {k: sum(e.after[k] for e in events) for k in deleted} == deleted
    # Nothing left to do: no further audit event.
    assert housekeeping.runs_purge_expired() == dict.fromkeys(deleted, 0)
    assert AuditEvent.objects.filter(action="traces.retention_purged").count() == len(events)


def test_a_chunk_whose_audit_row_fails_deletes_nothing(project, key, monkeypatch):
    """A crash between a chunk's deletions and its audit row cannot leave deletions unaudited: both are
    one transaction. The chunks before it stay deleted and audited."""
    project.retention_days = 30
    project.save()
    for run_id in ("old-1", "old-2"):
        accept(project, key, _tool_run(run_id))
    drain()
    _age(["old-1", "old-2"], days=40)
    before = _counts(project)
    calls = []
    real_audit = housekeeping.audit_record

    def audit_then_fail(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise RuntimeError("the process died here")
        return real_audit(**kwargs)

    monkeypatch.setattr(housekeeping, "audit_record", audit_then_fail)
    with pytest.raises(RuntimeError):
        housekeeping.runs_purge_expired(chunk_rows=2)
    after = _counts(project)
    events = list(AuditEvent.objects.filter(action="traces.retention_purged"))
    assert len(events) == 1
    audited = {k: events[0].after[k] for k in ("runs", "spans", "span_updates", "tool_calls")}
    assert {k: before[k] - after[k] for k in before} == audited


def test_one_chunk_deletes_at_most_its_rows_and_keeps_runs_until_they_are_empty(project, key):
    _one_expired_run(project, key)
    counts = dict.fromkeys(["runs", "spans", "span_updates", "tool_calls"], 0)
    cutoff = timezone.now() - timedelta(days=1)

    assert housekeeping._purge_chunk(project, cutoff, 2, 1, counts) is True
    assert counts == {"runs": 0, "spans": 0, "span_updates": 1, "tool_calls": 1}
    assert Run.objects.filter(run_id="old").exists() and Span.objects.count() == 2
    assert housekeeping._purge_chunk(project, cutoff, 2, 1, counts) is True
    assert counts["spans"] == 2 and Run.objects.filter(run_id="old").exists()
    assert housekeeping._purge_chunk(project, cutoff, 2, 1, counts) is True  # nothing of it left: the run goes
    assert counts["runs"] == 1 and not Run.objects.exists()
    assert housekeeping._purge_chunk(project, cutoff, 2, 1, counts) is False


def test_the_server_default_applies_to_projects_without_their_own(project, other_project, key, make_key,
                                                                   settings):
    settings.TRACES_RETENTION_DAYS = 10
    other_project.retention_days = 100
    other_project.save()
    accept(project, key, _tool_run("a"))
    accept(other_project, make_key(other_project)[0], _tool_run("b"))
    drain()
    _age(["a", "b"], days=20)
    assert housekeeping.runs_purge_expired()["runs"] == 1
    assert list(Run.objects.values_list("run_id", flat=True)) == ["b"]


def test_a_pass_stops_at_its_time_budget_and_the_next_one_goes_on(project, key):
    _one_expired_run(project, key)
    assert housekeeping.runs_purge_expired(budget_seconds=0) == dict.fromkeys(
        ["runs", "spans", "span_updates", "tool_calls"], 0)
    assert housekeeping.runs_purge_expired()["runs"] == 1


def test_dead_batches_and_records_are_kept_for_a_week_then_deleted(project, key):
    accept(project, key, [{"op": "launch.rockets", "run_id": "x"}])  # undecodable: dead whole
    accept(project, key, [{"op": "run.start", "run_id": "x", "started_at": "not a time"}])  # one dead record
    drain()
    dead = IngestBatch.objects.get(status="dead")
    assert dead.payload is not None
    record = DeadRecord.objects.get()
    services.inbox_sweep()
    assert IngestBatch.objects.filter(pk=dead.pk).exists() and DeadRecord.objects.filter(pk=record.pk).exists()
    IngestBatch.objects.filter(pk=dead.pk).update(processed_at=timezone.now() - timedelta(days=8))
    DeadRecord.objects.filter(pk=record.pk).update(created_at=timezone.now() - timedelta(days=8))
    services.inbox_sweep()
    assert not IngestBatch.objects.filter(pk=dead.pk).exists() and not DeadRecord.objects.exists()


# --- Settings and the schedule ----------------------------------------------------------------------

def test_retention_is_a_project_setting_admins_change_audited(project, alice, bob, client_for):
    r = client_for(alice).patch("/api/v1/projects/acme", {"retention_days": 30}, format="json")
    assert r.status_code == 200 and r.json()["retention_days"] == 30, r.content
    event = AuditEvent.objects.get(action="project.updated")
    assert event.before == {"retention_days": None} and event.after == {"retention_days": 30}
    for bad in (0, -1, "soon", 10**6):
        r = client_for(alice).patch("/api/v1/projects/acme", {"retention_days": bad}, format="json")
        assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", r.content
    assert client_for(bob).patch("/api/v1/projects/acme", {"retention_days": 1}, format="json").status_code == 403
    r = client_for(alice).patch("/api/v1/projects/acme", {"retention_days": None}, format="json")
    assert r.status_code == 200 and r.json()["retention_days"] is None
    project.refresh_from_db()
    assert project.retention_days is None


def test_beat_schedules_both_housekeeping_tasks():
    from controlplane.celery import app

    app.loader.import_default_modules()
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {"traces.runs_mark_lost", "traces.runs_purge_expired", "traces.inbox_sweep"} <= scheduled
    assert scheduled <= set(app.tasks)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not (os.environ.get("DATABASE_URL", "").startswith("postgres") and settings.REDIS_URL),
                    reason="needs PostgreSQL and Redis (a separate worker process)")
def test_a_real_worker_with_beat_marks_lost_and_purges(project, key, tmp_path):
    project.retention_days = 7
    project.save()
    # Finished: a running one would race the lost sweep (marking it lost is activity, which restarts
    # its retention), and which of the two beat sends first is not ours to decide.
    accept(project, key, [*_tool_run("ancient"), finish("ancient", status="completed")])
    drain()
    _age(["ancient"], days=8)
    purge_queue("ingest")
    purge_queue("default")
    worker = start_worker(tmp_path, "housekeeper", beat=True, queues="default,ingest",
                          env={"TRACES_LOST_AFTER_MINUTES": "0.05", "TRACES_LOST_SWEEP_SECONDS": "1",
                               "TRACES_RETENTION_SWEEP_SECONDS": "1"})
    try:
        accept(project, key, _tool_run("live"))  # the worker projects it, then it goes quiet
        wait_for(lambda: Run.objects.filter(run_id="live", span_count=2).exists(), 60, "the projection", tmp_path)
        wait_for(lambda: not Run.objects.filter(run_id="ancient").exists(), 60, "the retention purge", tmp_path)
        wait_for(lambda: Run.objects.filter(run_id="live", status="lost").exists(), 60, "the lost sweep",
                 tmp_path)
    finally:
        stop_worker(worker)
    assert Span.objects.aggregate(n=Sum("input_tokens"))["n"] == 5  # only "live" is left
    assert AuditEvent.objects.filter(action="traces.retention_purged").count() == 1


def test_stale_tables_follow_autoanalyzes_rule():
    from apps.traces.housekeeping import stale_tables

    counts = [("traces_span", 1_051, 10_000), ("traces_run", 1_050, 10_000), ("traces_toolcall", 51, -1),
              ("traces_spanupdate", 0, 0)]
    # threshold 50 + 10% of the rows (a never-analyzed table counts -1 rows: as empty)
    assert stale_tables(counts, 50, 0.1) == ["traces_span", "traces_toolcall"]
    assert stale_tables(counts, 50, 0.1, force=True) == ["traces_run", "traces_span", "traces_spanupdate",
                                                           "traces_toolcall"]


def test_stats_refresh_analyzes_the_run_log_tables_where_postgresql_would_not(project):
    from django.db import connection

    from apps.common.bulk import insert_rows
    from apps.traces.housekeeping import stats_refresh

    if connection.vendor != "postgresql":
        assert stats_refresh(force=True) == []  # SQLite keeps no planner statistics to refresh
        return
    run = Run.objects.create(project=project, run_id="r1", trace_id="t" * 32, started_at=timezone.now())
    insert_rows(Span, [{"project_id": project.pk, "run_id": run.pk, "trace_id": "t" * 32, "span_id": f"s{i}",
                        "name": "x", "start_time": timezone.now()} for i in range(120)])
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('autovacuum')::boolean")
        autovacuum = cursor.fetchone()[0]
        if autovacuum:
            assert stats_refresh() == []  # PostgreSQL's own autoanalyze does it
        assert stats_refresh(force=True) == ["traces_ingestbatch", "traces_run", "traces_span", "traces_spanupdate",
                                             "traces_toolcall"]
        cursor.execute("SELECT reltuples FROM pg_class WHERE relname = 'traces_span'")
        assert cursor.fetchone()[0] == 120  # the planner now knows the table's size
