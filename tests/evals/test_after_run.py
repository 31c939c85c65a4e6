"""After each run: a finished run's configured evaluators run once, whatever is re-sent, redelivered
or left behind by a dead worker. In process (PostgreSQL and SQLite), then with real Celery workers."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.evals import services, tasks
from apps.evals.models import EvalPending, EvalScore
from apps.traces.models import Run
from tests.traces.helpers import accept, drain, finish
from tests.traces.workers import purge_queue, start_worker, stop_worker, wait_for

CHECKS = [{"name": "run_succeeded"}, {"name": "silent_success"}]


@pytest.fixture
def no_delay(settings):
    settings.EVALS_AFTER_RUN_DELAY_SECONDS = 0


@pytest.fixture
def config(project, alice):
    return services.config_create(project=project, actor=alice, name="quality", evaluators=CHECKS)


def scores(run: Run) -> dict[str, tuple]:
    return {s.evaluator: (s.passed, s.label, s.source) for s in EvalScore.objects.filter(run=run)}


@pytest.mark.django_db
def test_a_finish_writes_its_outbox_row_with_it_and_a_step_scores_it_once(record, config, no_delay):
    run = record("r1", spans=[{"span_id": "t1", "kind": "tool", "tool": {"name": "lookup"}, "status": "error"}])
    pending = EvalPending.objects.get(run=run)
    assert (pending.state, pending.config_id, pending.attempts) == ("pending", config.pk, 0)
    assert services.after_run_step(run_pk=run.pk)["claimed"] == 1
    assert scores(run) == {"run_succeeded": (True, "completed", "after_run"),
                           "silent_success": (False, "tool_failed", "after_run")}
    pending.refresh_from_db()
    assert (pending.state, pending.generation, pending.attempts) == ("done", 1, 1)
    # Delivered again: nothing to claim, nothing added.
    assert services.after_run_step(run_pk=run.pk)["claimed"] == 0
    assert EvalScore.objects.filter(run=run).count() == 2


@pytest.mark.django_db
def test_a_re_sent_finish_schedules_nothing_more(record, config, project, agent_key, no_delay):
    run = record("r1")
    services.after_run_step(run_pk=run.pk)
    accept(project, agent_key[0], [finish("r1", status="completed", output="again")])
    drain()
    assert EvalPending.objects.filter(run=run).count() == 1
    assert services.after_run_step(run_pk=run.pk)["claimed"] == 0


@pytest.mark.django_db
def test_configurations_choose_runs_by_agent_and_sample(record, project, alice, no_delay):
    services.config_create(project=project, actor=alice, name="planner-only", agent_pattern="plan*",
                           evaluators=CHECKS)
    services.config_create(project=project, actor=alice, name="none", sample_rate=0, evaluators=CHECKS)
    half = services.config_create(project=project, actor=alice, name="half", sample_rate=0.5,
                                  evaluators=[{"name": "run_succeeded"}])
    services.config_create(project=project, actor=alice, name="off", enabled=False, evaluators=CHECKS)
    planner = record("p1", agent="planner")
    other = record("o1", agent="support-bot")
    names = {r: set(EvalPending.objects.filter(run=r).values_list("config__name", flat=True)) for r in (planner, other)}
    assert names[planner] - {"half"} == {"planner-only"} and names[other] - {"half"} == set()
    # The sample is decided by the run's id: a re-decision agrees, and about half of many runs are in.
    assert services.sampled(half, "p1") == ("half" in names[planner])
    share = sum(services.sampled(half, f"run-{i}") for i in range(2000)) / 2000
    assert 0.45 < share < 0.55


@pytest.mark.django_db
def test_runs_still_running_or_lost_are_not_evaluated_after_the_run(record, config):
    from apps.traces.housekeeping import runs_mark_lost

    open_run = record("open", finish_run=False)
    assert runs_mark_lost(now=timezone.now() + timedelta(days=1)) == 1
    open_run.refresh_from_db()
    assert open_run.status == "lost"  # a late span may revive it: a batch job may score it deliberately
    assert not EvalPending.objects.filter(run=open_run).exists()


@pytest.mark.django_db
def test_an_evaluation_waits_until_due_and_says_when(record, config, settings):
    settings.EVALS_AFTER_RUN_DELAY_SECONDS = 30
    run = record("r1")
    result = services.after_run_step(run_pk=run.pk)
    assert result["claimed"] == 0 and result["not_before"] > timezone.now() + timedelta(seconds=25)
    assert services.after_run_step(run_pk=run.pk, now=timezone.now() + timedelta(seconds=31))["claimed"] == 1


@pytest.mark.django_db
def test_a_claim_whose_lease_expired_is_taken_over_and_the_old_claimant_writes_nothing(record, config, no_delay):
    run = record("r1")
    pending = EvalPending.objects.get(run=run)
    # A worker claimed it (generation 1) and died: its lease runs out.
    EvalPending.objects.filter(pk=pending.pk).update(state="running", generation=1, attempts=1,
                                                     lease_until=timezone.now() - timedelta(seconds=1))
    assert services.pending_sweep() == 1
    assert services.after_run_step(run_pk=run.pk)["claimed"] == 1
    pending.refresh_from_db()
    assert (pending.state, pending.generation, pending.attempts) == ("done", 2, 2)
    assert EvalScore.objects.filter(run=run).count() == 2


@pytest.mark.django_db
def test_after_max_attempts_the_evaluation_is_given_up_visibly(record, config, no_delay, settings):
    run = record("r1")
    EvalPending.objects.filter(run=run).update(state="running", attempts=settings.EVALS_MAX_ATTEMPTS,
                                               lease_until=timezone.now() - timedelta(seconds=1))
    services.after_run_step(run_pk=run.pk)
    pending = EvalPending.objects.get(run=run)
    assert pending.state == "failed" and "given up" in pending.last_error
    assert not EvalScore.objects.filter(run=run).exists()


@pytest.mark.django_db
def test_the_sweep_enqueues_what_waits_too_long_only(record, config, no_delay, settings):
    settings.EVALS_ENQUEUE_GRACE_SECONDS = 60
    run = record("r1")
    assert services.pending_sweep() == 0  # just enqueued by the finish's commit
    EvalPending.objects.filter(run=run).update(enqueued_at=timezone.now() - timedelta(seconds=61))
    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert services.pending_sweep() == 1
    assert EvalPending.objects.get(run=run).state == "done"
    assert tasks.sweep() == {"after_run": 0, "jobs": 0}


# --- with real workers (PostgreSQL and Redis: a worker is another process) ----------------------


@pytest.fixture
def pg_only(db):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("a worker process cannot see SQLite's in-memory test database")


WORKER_ENV = {"EVALS_AFTER_RUN_DELAY_SECONDS": "0", "EVALS_LEASE_SECONDS": "2", "EVALS_SWEEP_SECONDS": "1",
              "EVALS_ENQUEUE_GRACE_SECONDS": "1"}


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_scores_each_finished_run_once_however_often_the_task_comes(
        pg_only, record, config, tmp_path, settings):
    settings.EVALS_AFTER_RUN_DELAY_SECONDS = 0
    purge_queue("default")
    worker = start_worker(tmp_path, "evals", beat=True, queues="default", env=WORKER_ENV)
    try:
        runs = [record(f"r{i}", spans=[{"span_id": "t", "kind": "tool", "tool": {"name": "x"},
                                        "status": "error" if i % 2 else "ok"}]) for i in range(6)]
        wait_for(lambda: EvalPending.objects.filter(state="done").count() == 6, 60, "six runs evaluated", tmp_path)
        # Redelivered, duplicated: every run's task again, three times over.
        for _ in range(3):
            for run in runs:
                tasks.after_run.delay(run.pk)
        # A run whose claim a dead worker holds (generation bumped, lease running out): the beat's
        # sweep enqueues it once the lease expires and the live worker takes it over.
        orphan = record("orphan")
        EvalPending.objects.filter(run=orphan).update(state="running", generation=7, attempts=1,
                                                      lease_until=timezone.now() + timedelta(seconds=2))
        wait_for(lambda: EvalPending.objects.filter(run=orphan, state="done").exists(), 60, "the orphan", tmp_path)
        time_after = timezone.now() + timedelta(seconds=3)
        wait_for(lambda: timezone.now() > time_after, 10, "the duplicates to be consumed", tmp_path)
    finally:
        stop_worker(worker)
    assert EvalScore.objects.count() == 2 * 7
    assert sorted(EvalPending.objects.values_list("generation", flat=True)) == [1] * 6 + [8]
    for run in runs:
        expected = (False, "tool_failed", "after_run") if int(run.run_id[1:]) % 2 else (True, "ok", "after_run")
        assert scores(run)["silent_success"] == expected
