"""Batch evals over history: a job's batch walks its window in lanes side by side, each in chunks (each
chunk's scores, its lane's cursor and the batch's counts committed together), picks runs by agent, version, status and sample, runs one at a time per
job, is resumed after a dead worker and adds nothing when run again; its cron is a beat entry. In
process first (each chunk enqueues the next: run eagerly here), then with real Celery workers and beat
(10,000 runs, a worker SIGKILLed mid-batch), then llm_judge in a batch through the gateway."""
from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from apps.audit.models import AuditEvent
from apps.common.errors import ApiError
from apps.evals import jobs, live
from apps.evals.models import EvalJob, EvalJobLane, EvalJobRun, EvalScore
from apps.traces.models import Run
from tests.evals.test_judge import VERDICT, through_gateway  # noqa: F401
from tests.gateway.conftest import _gateway_quiet, gateway_server, needs_postgres, upstream  # noqa: F401
from tests.traces.workers import kill_worker, purge_queue, start_worker, stop_worker, wait_for

CHECKS = [{"name": "run_succeeded"}, {"name": "json_valid"}, {"name": "contains", "config": {"text": "ok"}}]


def historical_runs(project, n: int, *, start=None, prefix: str = "h") -> list[Run]:
    """``n`` finished runs started one second apart before ``start`` (default: an hour ago): agents
    support-bot / planner / triage in turn, versions 1 and 2, every tenth failed, JSON output on even
    ones."""
    start = start or timezone.now() - timedelta(hours=1)
    rows = []
    for i in range(n):
        at = start - timedelta(seconds=n - i)
        failed = i % 10 == 9
        rows.append(Run(project=project, run_id=f"{prefix}-{i:05d}", trace_id=f"{i:032x}",
                        agent_name=("support-bot", "planner", "triage")[i % 3], agent_version=str(1 + i % 2),
                        status="failed" if failed else "completed", start_received=True, started_at=at,
                        ended_at=at + timedelta(milliseconds=500), duration_ms=500,
                        output=json.dumps({"answer": "ok"}) if i % 2 == 0 else "plain text"))
    Run.objects.bulk_create(rows, batch_size=2000)
    return list(Run.objects.filter(project=project, run_id__startswith=f"{prefix}-").order_by("pk"))


def walk(batch: EvalJobRun, limit: int = 1000) -> EvalJobRun:
    """Step a batch chunk by chunk, a chunk of each lane in turn, in process, until it stops running."""
    for _ in range(limit):
        batch.refresh_from_db()
        if batch.state != "running":
            return batch
        for lane in batch.lane_set.filter(done=False):
            jobs.job_chunk_step(lane_pk=lane.pk)
    raise AssertionError("the batch never finished")


@pytest.fixture
def job(project, alice):
    return jobs.job_create(project=project, actor=alice, name="nightly", evaluators=CHECKS, window_hours=24)


# --- in process ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_batch_over_10000_runs_walks_its_window_in_chunks_and_run_again_adds_nothing(
        project, alice, job, settings, django_capture_on_commit_callbacks):
    settings.EVALS_JOB_CHUNK = 1000
    settings.EVALS_JOB_LANES = 2  # two lanes of 5,000 runs
    settings.CELERY_TASK_ALWAYS_EAGER = True  # each chunk enqueues the next: here they run inline
    historical_runs(project, 10_000)
    old = historical_runs(project, 5, start=timezone.now() - timedelta(days=3), prefix="old")  # before the window
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(live.project_group(project.pk), channel)

    with django_capture_on_commit_callbacks(execute=True):
        batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    batch.refresh_from_db()
    assert (batch.state, batch.total, batch.scanned, batch.evaluated, batch.chunks) == (
        "succeeded", 10_000, 10_000, 10_000, 10)
    assert batch.scores_added == 30_000 == EvalScore.objects.filter(job_run=batch, source="job").count()
    assert batch.errors == 0 and batch.progress == 1.0 and batch.finished_at is not None
    assert not EvalScore.objects.filter(run__in=old).exists()
    counts = {(s, p): n for s, p, n in _tally(batch)}
    assert counts == {("run_succeeded", True): 9000, ("run_succeeded", False): 1000, ("json_valid", True): 5000,
                      ("json_valid", False): 5000, ("contains", True): 5000, ("contains", False): 5000}
    # Progress was published after each chunk's commit.
    seen = [async_to_sync(layer.receive)(channel) for _ in range(10)]
    assert [m["scanned"] for m in seen] == list(range(1000, 10_001, 1000)) and seen[-1]["state"] == "succeeded"
    assert AuditEvent.objects.filter(action="evals.job_started", actor_repr="alice").count() == 1

    with django_capture_on_commit_callbacks(execute=True):
        again = jobs.job_start(job=job, trigger="manual", actor=alice)
    again.refresh_from_db()
    assert (again.state, again.scanned, again.evaluated, again.scores_added) == ("succeeded", 10_000, 10_000, 0)
    assert EvalScore.objects.count() == 30_000


def _tally(batch):
    from django.db.models import Count

    return (EvalScore.objects.filter(job_run=batch).values_list("evaluator", "passed")
            .annotate(n=Count("id")).order_by())


@pytest.mark.django_db
def test_the_filter_picks_agents_versions_statuses_and_a_stable_sample(project, alice):
    runs = historical_runs(project, 300)
    wanted = {r.run_id for r in runs if r.agent_name.startswith("plan") and r.agent_version == "2"}
    job = jobs.job_create(project=project, actor=alice, name="planners", evaluators=[{"name": "run_succeeded"}],
                          agent_pattern="plan*", agent_version="2")
    batch = walk(jobs.job_start(job=job, trigger="manual", actor=alice))
    assert batch.total == len(wanted) and batch.evaluated == len(wanted)
    assert set(EvalScore.objects.filter(job_run=batch).values_list("run__run_id", flat=True)) == wanted

    failed = jobs.job_create(project=project, actor=alice, name="failures", evaluators=[{"name": "run_succeeded"}],
                             agent_pattern="*-bot", statuses=["failed"])
    batch = walk(jobs.job_start(job=failed, trigger="manual", actor=alice))
    assert set(EvalScore.objects.filter(job_run=batch).values_list("run__run_id", flat=True)) == {
        r.run_id for r in runs if r.agent_name == "support-bot" and r.status == "failed"}

    sample = jobs.job_create(project=project, actor=alice, name="sample", evaluators=[{"name": "json_valid"}],
                             sample_size=25)
    first = walk(jobs.job_start(job=sample, trigger="manual", actor=alice))
    picked = set(EvalScore.objects.filter(job_run=first).values_list("run__run_id", flat=True))
    assert first.evaluated == 25 == len(picked)
    second = walk(jobs.job_start(job=sample, trigger="manual", actor=alice))
    assert (second.evaluated, second.scores_added) == (25, 0)  # the same runs: nothing new


@pytest.mark.django_db
def test_one_batch_of_a_job_runs_at_a_time_and_a_bad_window_is_refused(project, alice, job):
    historical_runs(project, 10)
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    with pytest.raises(ApiError) as exc:
        jobs.job_start(job=job, trigger="manual", actor=alice)
    assert (exc.value.status_code, exc.value.error_code) == (409, "job_running")
    assert jobs.job_scheduled(job_pk=job.pk) is None  # the cron firing meanwhile starts nothing
    walk(batch)
    now = timezone.now()
    with pytest.raises(ApiError) as exc:
        jobs.job_start(job=job, trigger="manual", actor=alice, window_start=now, window_end=now - timedelta(hours=1))
    assert exc.value.error_code == "invalid_request"


@pytest.mark.django_db
def test_a_batch_is_split_into_lanes_of_as_many_runs_and_a_small_one_is_one_lane(project, alice, job, settings):
    settings.EVALS_JOB_CHUNK = 100
    runs = historical_runs(project, 1000)
    # Runs the job does not ask for interleave with its ids: the lanes still hold as many of its runs each.
    for r in runs[::4]:
        Run.objects.filter(pk=r.pk).update(status="running")  # not a status the job asks for
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    lanes = list(batch.lane_set.all())
    assert batch.lanes == len(lanes) == settings.EVALS_JOB_LANES == 4
    assert lanes[0].lo_pk == batch.first_pk - 1 and lanes[-1].hi_pk == batch.last_pk
    assert all(a.hi_pk == b.lo_pk for a, b in zip(lanes, lanes[1:], strict=False))
    window = Run.objects.filter(project=project, status__in=["completed", "failed"])
    assert [window.filter(pk__gt=lane.lo_pk, pk__lte=lane.hi_pk).count() for lane in lanes] == [187, 188, 187, 188]
    walk(batch)
    assert (batch.state, batch.scanned, batch.evaluated) == ("succeeded", 750, 750)
    assert all(lane.done for lane in batch.lane_set.all())

    settings.EVALS_JOB_CHUNK = 500  # 750 runs: two chunks' worth, two lanes
    assert jobs.job_start(job=job, trigger="manual", actor=alice).lane_set.count() == 2
    EvalJobRun.objects.update(state="succeeded")
    settings.EVALS_JOB_CHUNK = 1000
    assert jobs.job_start(job=job, trigger="manual", actor=alice).lane_set.count() == 1


@pytest.mark.django_db
def test_a_live_lease_turns_a_duplicate_away_and_an_expired_one_is_resumed_from_its_lanes_cursor(
        project, alice, job, settings):
    settings.EVALS_JOB_CHUNK = 40
    settings.EVALS_JOB_LANES = 2
    historical_runs(project, 100)
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    first, second = batch.lane_set.all()
    assert second.hi_pk - second.lo_pk == first.hi_pk - first.lo_pk == 50
    assert jobs.job_chunk_step(lane_pk=first.pk)["scanned"] == 40
    first.refresh_from_db()
    cursor = first.cursor
    # A worker claims the lane's next chunk (generation + 1, a live lease) and dies without committing.
    EvalJobLane.objects.filter(pk=first.pk).update(generation=first.generation + 1, attempts=1,
                                                   lease_until=timezone.now() + timedelta(minutes=5))
    assert jobs.job_chunk_step(lane_pk=first.pk) == {"claimed": False}  # a duplicate while the lease lives
    assert jobs.job_chunk_step(lane_pk=second.pk)["scanned"] == 40  # the other lane walks on meanwhile
    assert jobs.job_sweep() == 0
    EvalJobLane.objects.filter(pk=first.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert jobs.job_sweep() == 1  # resumed: the lane's next chunk, from its cursor
    first.refresh_from_db()
    assert first.cursor > cursor and first.done and (first.chunks, first.attempts, first.generation) == (2, 0, 3)
    batch.refresh_from_db()
    assert (batch.state, batch.scanned, batch.chunks) == ("running", 90, 3)  # the second lane has 10 to go
    walk(batch)
    assert (batch.state, batch.scanned, batch.chunks) == ("succeeded", 100, 4)
    assert EvalScore.objects.filter(job_run=batch).count() == 300


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent transactions: PostgreSQL")
def test_lanes_committing_at_once_count_every_chunk_and_the_last_one_finishes_the_batch(project, alice, job, settings):
    settings.EVALS_JOB_CHUNK = 50
    settings.EVALS_JOB_LANES = 4
    historical_runs(project, 200)  # four lanes of one chunk each, all committed at once
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    barrier = threading.Barrier(4)
    results = []

    def lane(pk):
        try:
            barrier.wait(10)
            results.append(jobs.job_chunk_step(lane_pk=pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=lane, args=(pk,)) for pk in batch.lane_set.values_list("pk", flat=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r["scanned"] for r in results) == [50] * 4 and all(r["done"] for r in results)
    batch.refresh_from_db()
    assert (batch.state, batch.scanned, batch.chunks, batch.scores_added) == ("succeeded", 200, 4, 600)
    assert EvalScore.objects.filter(job_run=batch).count() == 600


@pytest.mark.django_db
def test_a_chunk_that_keeps_killing_its_worker_is_given_up_visibly(project, alice, job, settings):
    historical_runs(project, 10)
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    lane = batch.lane_set.get()
    EvalJobLane.objects.filter(pk=lane.pk).update(attempts=settings.EVALS_MAX_ATTEMPTS,
                                                  lease_until=timezone.now() - timedelta(seconds=1))
    assert jobs.job_chunk_step(lane_pk=lane.pk) == {"claimed": True, "failed": True}
    batch.refresh_from_db()
    assert batch.state == "failed" and "given up" in batch.last_error
    assert not EvalScore.objects.exists()
    assert jobs.job_sweep() == 0  # a failed batch's lanes are resumed no more


@pytest.mark.django_db
def test_a_cancelled_batch_stops_and_no_lane_claims_a_next_chunk(project, alice, job, settings):
    settings.EVALS_JOB_CHUNK = 5
    historical_runs(project, 20)
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    lanes = list(batch.lane_set.values_list("pk", flat=True))
    assert len(lanes) == 4
    jobs.job_chunk_step(lane_pk=lanes[0])
    batch = jobs.job_cancel(batch=batch, actor=alice)
    assert batch.state == "cancelled" and batch.scanned == 5
    assert [jobs.job_chunk_step(lane_pk=pk) for pk in lanes] == [{"claimed": False}] * 4
    assert jobs.job_sweep() == 0
    assert EvalScore.objects.count() == 15
    assert AuditEvent.objects.filter(action="evals.job_cancelled").count() == 1


# --- the API and the schedule --------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_jobs_cron_is_a_beat_entry_kept_in_step_with_it(project, alice, client_for):
    api = client_for(alice)
    resp = api.post("/api/v1/projects/acme/eval-jobs", {"name": "nightly", "evaluators": CHECKS,
                                                         "schedule": "30 3 * * 1-5"}, format="json")
    assert resp.status_code == 201, resp.json()
    job = EvalJob.objects.get(pk=resp.json()["id"])
    task = PeriodicTask.objects.get(name=f"evals.job.{job.pk}")
    assert (task.task, json.loads(task.args), task.enabled) == ("evals.job_scheduled", [job.pk], True)
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == ("30", "3", "1-5")
    next_at = timezone.datetime.fromisoformat(resp.json()["next_run_at"])
    assert next_at > timezone.now() and (next_at.hour, next_at.minute) == (3, 30)

    bad = api.patch(f"/api/v1/projects/acme/eval-jobs/{job.pk}", {"schedule": "61 * * * *"}, format="json")
    assert bad.status_code == 400 and bad.json()["error_code"] == "invalid_request"
    assert bad.json()["details"]["field"] == "schedule"
    assert api.patch(f"/api/v1/projects/acme/eval-jobs/{job.pk}", {"enabled": False}, format="json").status_code == 200
    assert not PeriodicTask.objects.filter(name=f"evals.job.{job.pk}").exists()
    assert api.patch(f"/api/v1/projects/acme/eval-jobs/{job.pk}", {"enabled": True}, format="json").status_code == 200
    assert PeriodicTask.objects.filter(name=f"evals.job.{job.pk}").exists()
    assert api.delete(f"/api/v1/projects/acme/eval-jobs/{job.pk}").status_code == 204
    assert not PeriodicTask.objects.filter(name__startswith="evals.job.").exists()
    assert list(AuditEvent.objects.filter(action__startswith="evals.job_").values_list("action", flat=True)
                .order_by("seq")) == ["evals.job_created", "evals.job_updated", "evals.job_updated",
                                      "evals.job_deleted"]


@pytest.mark.django_db
def test_a_batch_is_started_read_and_cancelled_over_http(project, alice, bob, job, client_for):
    historical_runs(project, 10)
    api = client_for(alice)
    resp = api.post(f"/api/v1/projects/acme/eval-jobs/{job.pk}/runs", {}, format="json")
    assert resp.status_code == 201, resp.json()
    body = resp.json()
    assert (body["state"], body["trigger"], body["started_by"], body["total"]) == ("running", "manual", "alice", 10)
    again = api.post(f"/api/v1/projects/acme/eval-jobs/{job.pk}/runs", {}, format="json")
    assert again.status_code == 409 and again.json()["error_code"] == "job_running"
    listed = client_for(bob).get(f"/api/v1/projects/acme/eval-jobs/{job.pk}/runs").json()
    assert [b["id"] for b in listed] == [body["id"]]
    cancelled = api.post(f"/api/v1/projects/acme/eval-jobs/{job.pk}/runs/{body['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    window = {"window_start": (timezone.now() - timedelta(days=30)).isoformat(),
              "window_end": (timezone.now() - timedelta(days=29)).isoformat()}
    empty = api.post(f"/api/v1/projects/acme/eval-jobs/{job.pk}/runs", window, format="json").json()
    assert empty["total"] == 0
    assert walk(EvalJobRun.objects.get(pk=empty["id"])).state == "succeeded"


# --- real workers and beat (PostgreSQL and Redis) --------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="workers are other processes: PostgreSQL only")
def test_beat_starts_the_batch_a_killed_worker_leaves_it_resumable_and_a_rerun_adds_nothing(
        project, alice, tmp_path):
    purge_queue("default")
    historical_runs(project, 10_000)
    job = jobs.job_create(project=project, actor=alice, name="nightly", evaluators=CHECKS, schedule="* * * * *")
    # Its cron last fired two minutes ago: beat finds it due as soon as it starts.
    PeriodicTask.objects.filter(pk=job.periodic_task_id).update(last_run_at=timezone.now() - timedelta(minutes=2))
    env = {"EVALS_JOB_CHUNK": "500", "EVALS_JOB_LEASE_SECONDS": "3", "EVALS_SWEEP_SECONDS": "1",
           "EVALS_ENQUEUE_GRACE_SECONDS": "2"}
    first = start_worker(tmp_path, "first", beat=True, queues="default", env=env)
    try:
        wait_for(lambda: EvalJobRun.objects.filter(job=job, scanned__gte=2000).exists(), 90,
                 "beat to start the batch and two thousand runs scanned", tmp_path)
        kill_worker(first)  # SIGKILL, beat too: the chunk in flight never commits
    finally:
        stop_worker(first)
    batch = EvalJobRun.objects.get(job=job)
    assert batch.trigger == "schedule" and batch.state == "running"
    at_kill = batch.scanned
    second = start_worker(tmp_path, "second", beat=True, queues="default", env=env)
    try:
        wait_for(lambda: EvalJobRun.objects.get(pk=batch.pk).state != "running", 120,
                 "the batch to be resumed and finish", tmp_path)
        batch.refresh_from_db()
        assert (batch.state, batch.scanned, batch.evaluated) == ("succeeded", 10_000, 10_000)
        assert batch.scores_added == 30_000 == EvalScore.objects.count()
        assert batch.scanned > at_kill and batch.chunks == 20
        # Run again (its cron off first, so that beat starts no other): no score added.
        jobs.job_update(job=job, actor=alice, schedule="")
        rerun = jobs.job_start(job=job, trigger="manual", actor=alice)
        wait_for(lambda: EvalJobRun.objects.get(pk=rerun.pk).state != "running", 120, "the rerun", tmp_path)
        rerun.refresh_from_db()
        assert (rerun.state, rerun.evaluated, rerun.scores_added) == ("succeeded", 10_000, 0)
        assert EvalScore.objects.count() == 30_000
    finally:
        stop_worker(second)


# --- llm_judge in a batch (Daphne and a fake OpenAI server) -----------------------------------------------


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_a_batch_judges_through_the_gateway_in_small_chunks(project, alice, through_gateway, settings):  # noqa: F811
    settings.EVALS_JOB_JUDGE_CHUNK = 2
    historical_runs(project, 5)
    job = jobs.job_create(project=project, actor=alice, name="judged", evaluators=[
        {"name": "llm_judge", "config": {"model": "gpt-4o", "rubric": "Is it right?"}}, {"name": "run_succeeded"}])
    batch = walk(jobs.job_start(job=job, trigger="manual", actor=alice))
    assert (batch.state, batch.chunks, batch.evaluated, batch.scores_added) == ("succeeded", 3, 5, 10)
    judged = EvalScore.objects.filter(job_run=batch, evaluator="llm_judge")
    assert {(s.outcome, s.score) for s in judged} == {("scored", VERDICT["score"])} and judged.count() == 5
    assert len(through_gateway.snapshot()) == 5
    assert len({s.details["judge_run_id"] for s in judged}) == 5


@pytest.mark.django_db(transaction=True)
@needs_postgres
def test_a_batch_cancelled_while_its_judge_answers_stores_nothing_of_that_chunk(
        project, alice, through_gateway, settings):  # noqa: F811
    settings.EVALS_JOB_JUDGE_CHUNK = 2
    through_gateway.first_token_delay = 1.5
    historical_runs(project, 4)
    job = jobs.job_create(project=project, actor=alice, name="judged", evaluators=[
        {"name": "llm_judge", "config": {"model": "gpt-4o", "rubric": "Is it right?"}}])
    batch = jobs.job_start(job=job, trigger="manual", actor=alice)
    outcome = {}

    def chunk():
        try:
            outcome.update(jobs.job_chunk_step(lane_pk=batch.lane_set.first().pk))
        finally:
            connection.close()

    worker = threading.Thread(target=chunk)
    worker.start()
    assert through_gateway.wait_for(lambda: len(through_gateway.snapshot()) >= 1, 10)
    jobs.job_cancel(batch=batch, actor=alice)
    worker.join(30)
    assert outcome == {"claimed": True, "stale": True}
    batch.refresh_from_db()
    assert (batch.state, batch.scanned, batch.scores_added) == ("cancelled", 0, 0)
    assert not EvalScore.objects.exists()
