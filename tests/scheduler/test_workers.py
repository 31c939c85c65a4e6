"""The queue with real Celery workers on Redis (PostgreSQL and Redis only: a worker is another process): a
prefork worker consuming both declared GPUs' queues and the default queue, with beat ticking the dispatcher.
The work is the ``record`` handler (tests/scheduler/handlers.py): each completed run appends its tag to a
file, so every test counts how many times each task's work was done."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from django.db import connections

from apps.scheduler import dispatcher, services, tasks
from apps.scheduler.models import DispatchEvent, QueueTask
from tests.traces.workers import kill_worker, purge_queue, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUES = "default,gpu.declared.gpu0,gpu.declared.gpu1"
ENV = {"SCHEDULER_HANDLER_MODULES": "tests.scheduler.handlers", "SCHEDULER_GPUS": "declared",
       "SCHEDULER_DECLARED_GPUS": "gpu0:10512,gpu1:16896", "SCHEDULER_LEASE_SECONDS": "3",
       "SCHEDULER_HEARTBEAT_SECONDS": "0.2", "SCHEDULER_CLAIM_GRACE_SECONDS": "3", "SCHEDULER_TICK_SECONDS": "1",
       "SCHEDULER_STARVATION_SECONDS": "2"}


@pytest.fixture
def pg_only(db):
    if connections["default"].vendor != "postgresql":
        pytest.skip("a worker process cannot see SQLite's in-memory test database")


@pytest.fixture
def two_gpus(pg_only, make_device, make_backend, settings):
    settings.SCHEDULER_HEARTBEAT_SECONDS = 0.2
    settings.SCHEDULER_LEASE_SECONDS = 3
    for queue in QUEUES.split(","):
        purge_queue(queue)
    d0, d1 = make_device("gpu0", memory_mb=10_512), make_device("gpu1", memory_mb=16_896)  # 10,000 / 16,384 usable
    models = {"small": {"load_mb": 1000, "request_mb": 100}, "big": {"load_mb": 3000, "request_mb": 500}}
    return (d0, d1), make_backend(d0, name="b0", models=models, concurrency=3), \
        make_backend(d1, name="b1", models=models, concurrency=3)


@pytest.fixture
def worker(tmp_path):
    started = []

    def start(name="gpu"):
        proc = start_worker(tmp_path, name, beat=True, queues=QUEUES, env=ENV, concurrency=6)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_worker(proc)


def submit(project, tmp_path, tag, *, seconds=0.0, **fields):
    return services.submit(project=project, kind="custom", model=fields.pop("model", "small"),
                           task_input={"path": str(tmp_path / "done.txt"), "tag": tag, "seconds": seconds},
                           **fields).task


def done(tmp_path) -> Counter:
    path = tmp_path / "done.txt"
    return Counter(path.read_text().split()) if path.exists() else Counter()


def state(task) -> str:
    return QueueTask.objects.get(pk=task.pk).state


def test_two_hundred_tasks_of_random_sizes_on_two_devices_never_exceed_either(
        project, two_gpus, worker, tmp_path):
    (d0, d1), _, _ = two_gpus
    rng = random.Random(28)
    watching, peaks = True, {d0.pk: 0, d1.pk: 0}

    def watch():  # the ledger of each device, sampled while the workers run
        try:
            while watching:
                for d in (d0, d1):
                    peaks[d.pk] = max(peaks[d.pk], dispatcher.held_mb(d.pk))
                time.sleep(0.005)
        finally:
            connections.close_all()

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker()
    try:
        submitted = [submit(project, tmp_path, f"t{i}", seconds=rng.uniform(0, 0.05),
                            model=rng.choice(["small", "big"]), memory_mb=rng.randint(0, 6000),
                            backend=rng.choice(["b0", "b1"]), priority=rng.randint(-2, 2)) for i in range(200)]
        wait_for(lambda: QueueTask.objects.filter(state="succeeded").count() == 200, 240, "200 tasks", tmp_path)
    finally:
        watching = False
        watcher.join()
    assert len(submitted) == 200 and done(tmp_path) == Counter({f"t{i}": 1 for i in range(200)})
    assert peaks[d0.pk] <= 10_000 and peaks[d1.pk] <= 16_384, peaks
    assert peaks[d0.pk] > 0 and peaks[d1.pk] > 0
    assert not QueueTask.objects.exclude(state="succeeded").exists()


def test_pause_stops_new_starts_and_resume_restarts_them_and_throttle_spaces_them(
        project, two_gpus, worker, olga, tmp_path):
    (d0, _), b0, _ = two_gpus
    worker()
    warm = submit(project, tmp_path, "warm", backend="b0")
    wait_for(lambda: state(warm) == "succeeded", 60, "the model loaded", tmp_path)
    services.control_set(project=project, user=olga, device=d0, paused=True, reason="maintenance")
    held = [submit(project, tmp_path, f"p{i}", backend="b0") for i in range(3)]
    time.sleep(3)  # three ticks: nothing starts while paused
    assert [state(t) for t in held] == ["queued"] * 3
    services.control_set(project=project, user=olga, device=d0, paused=False, reason="done")
    wait_for(lambda: all(state(t) == "succeeded" for t in held), 60, "the paused tasks", tmp_path)
    services.control_set(project=project, user=olga, backend=b0, throttle_ms=700, reason="cool down")
    spaced = [submit(project, tmp_path, f"s{i}", backend="b0") for i in range(4)]
    wait_for(lambda: all(state(t) == "succeeded" for t in spaced), 60, "the throttled tasks", tmp_path)
    starts = sorted(QueueTask.objects.filter(pk__in=[t.pk for t in spaced]).values_list("admitted_at", flat=True))
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g >= 0.7 for g in gaps), gaps


def test_cancel_and_redirect_queued_and_running_tasks_do_each_tasks_work_once(
        project, two_gpus, worker, olga, tmp_path):
    (d0, _), _, b1 = two_gpus
    worker()
    services.control_set(project=project, user=olga, device=d0, paused=True, reason="hold the queue")
    queued_cancel = submit(project, tmp_path, "qc", backend="b0")
    queued_move = submit(project, tmp_path, "qm", backend="b0")
    services.cancel(task=queued_cancel, user=olga, reason="not needed")
    services.redirect(task=queued_move, backend=b1, user=olga, reason="gpu0 is paused")
    services.control_set(project=project, user=olga, device=d0, paused=False, reason="go")
    running_cancel = submit(project, tmp_path, "rc", backend="b0", seconds=60)
    running_move = submit(project, tmp_path, "rm", backend="b0", seconds=60)
    wait_for(lambda: state(running_cancel) == state(running_move) == "running", 60, "both running", tmp_path)
    services.cancel(task=running_cancel, user=olga, reason="runaway")
    services.redirect(task=running_move, backend=b1, user=olga, reason="move it")
    QueueTask.objects.filter(pk=running_move.pk).update(input={**running_move.input, "seconds": 0})
    wait_for(lambda: state(running_cancel) == "cancelled" and state(running_move) == "succeeded"
             and state(queued_move) == "succeeded", 60, "cancel and redirect", tmp_path)
    assert state(queued_cancel) == "cancelled"
    assert done(tmp_path) == Counter({"qm": 1, "rm": 1})
    moved = QueueTask.objects.get(pk=running_move.pk)
    assert (moved.backend_id, moved.redirects) == (b1.pk, 1)
    assert [e.backend for e in DispatchEvent.objects.filter(task=moved, event="started")] == ["b0", "b1"]


def test_a_duplicated_message_does_not_run_a_task_twice(project, two_gpus, worker, tmp_path):
    worker()
    task = submit(project, tmp_path, "dup", backend="b0", seconds=0.5)
    wait_for(lambda: state(task) in ("running", "succeeded"), 60, "the task started", tmp_path)
    generation = QueueTask.objects.get(pk=task.pk).generation
    for _ in range(3):  # the same message again, while it runs and after
        tasks.run.apply_async((task.pk, generation), queue="gpu.declared.gpu0")
    wait_for(lambda: state(task) == "succeeded", 60, "the task", tmp_path)
    time.sleep(1.5)  # the duplicates are consumed
    assert done(tmp_path) == Counter({"dup": 1})
    assert DispatchEvent.objects.filter(task=task, event="started").count() == 1


def test_a_worker_killed_mid_task_leaves_it_running_once_then_retried_once(project, two_gpus, worker, tmp_path):
    first = worker("first")
    task = submit(project, tmp_path, "killed", backend="b0", seconds=4)
    wait_for(lambda: state(task) == "running", 60, "the task running", tmp_path)
    kill_worker(first)  # SIGKILL, worker and beat: no goodbye
    second = worker("second")
    wait_for(lambda: state(task) == "succeeded", 90, "the retried task", tmp_path)
    assert second.poll() is None
    events = list(DispatchEvent.objects.filter(task=task).values_list("event", "generation"))
    starts = [g for e, g in events if e == "started"]
    assert len(starts) == 2 and starts[0] < starts[1], events  # a new generation, after the lease ran out
    retried = DispatchEvent.objects.get(task=task, event="retried")
    second_start = DispatchEvent.objects.filter(task=task, event="started").order_by("at").last()
    assert retried.at <= second_start.at
    assert done(tmp_path) == Counter({"killed": 1})
    assert QueueTask.objects.get(pk=task.pk).attempts == 2
