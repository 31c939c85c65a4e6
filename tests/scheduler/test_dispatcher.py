"""The dispatcher and the worker's side on the queue of record (declared GPUs, the ``record`` handler;
the workers here are the executor's functions called as a worker calls them, and threads where two things
must happen at once; tests/scheduler/test_workers.py runs real Celery workers)."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.audit.models import AuditEvent
from apps.common.errors import ApiError
from apps.scheduler import dispatcher, executor, services
from apps.scheduler.models import Backend, Device, DispatchEvent, GpuReading, LoadedModel, QueueTask

pytestmark = pytest.mark.django_db

State = QueueTask.State


def submit(project, tmp_path, tag="t", model="m", **fields):
    task_input = {"path": str(tmp_path / "done.txt"), "tag": tag, **fields.pop("task_input", {})}
    return services.submit(project=project, kind="custom", model=model, task_input=task_input, **fields).task


def states(*tasks):
    return [QueueTask.objects.get(pk=t.pk).state for t in tasks]


def done_tags(tmp_path):
    path = tmp_path / "done.txt"
    return path.read_text().split() if path.exists() else []


def work(task):
    """Run an admitted task's attempt as its worker would (its message: id and generation)."""
    task.refresh_from_db()
    return executor.run(task.pk, task.generation)


def test_admits_what_fits_by_the_ledger_and_one_load_at_a_time(project, make_device, make_backend, tmp_path):
    device = make_device()  # 10,000 MiB usable
    make_backend(device)  # m: load 2,000, request 1,000
    tasks = [submit(project, tmp_path, tag=str(i)) for i in range(10)]
    assert dispatcher.dispatch_device(device.pk) == [tasks[0].pk]  # the load, then nothing else for m until loaded
    assert dispatcher.held_mb(device.pk) == 3000
    assert LoadedModel.objects.get().state == "loading"
    assert work(tasks[0]) == "succeeded"
    assert LoadedModel.objects.get().state == "loaded"
    admitted = dispatcher.dispatch_device(device.pk)
    assert admitted == [t.pk for t in tasks[1:9]]  # 2,000 for the model + 8 × 1,000
    assert dispatcher.held_mb(device.pk) == 10_000
    assert dispatcher.dispatch_device(device.pk) == []
    assert work(tasks[1]) == "succeeded"
    assert dispatcher.dispatch_device(device.pk) == [tasks[9].pk]
    event = DispatchEvent.objects.get(task=tasks[9], event="admitted")
    assert event.device == "gpu0" and event.backend == "b0" and event.waited_ms >= 0


def test_priority_first_then_age(project, make_device, make_backend, tmp_path):
    device = make_device(memory_mb=3512)  # room for the model and one task
    make_backend(device)
    first = submit(project, tmp_path, tag="first")
    assert dispatcher.dispatch_device(device.pk) == [first.pk]
    work(first)
    old = submit(project, tmp_path, tag="old")
    urgent = submit(project, tmp_path, tag="urgent", priority=5)
    assert dispatcher.dispatch_device(device.pk) == [urgent.pk]
    work(urgent)
    assert dispatcher.dispatch_device(device.pk) == [old.pk]


def test_the_live_reading_below_the_ledger_limits_admission_and_a_stale_one_is_no_reading(
        project, make_device, make_backend, tmp_path):
    device = make_device()
    make_backend(device, models={"m": {"load_mb": 0, "request_mb": 1000}})
    now = timezone.now()
    # Another process holds most of the GPU: NVML sees 3,256 MiB free, less the 256 MiB margin = 3 tasks.
    GpuReading.objects.create(gpu=device.gpu, source="nvml", total_mb=10_512, used_mb=7256, free_mb=3256,
                              read_at=now)
    tasks = [submit(project, tmp_path, tag=str(i)) for i in range(6)]
    assert dispatcher.dispatch_device(device.pk, now=now) == [tasks[0].pk]  # loading (0 MiB): one at a time
    work(tasks[0])
    assert dispatcher.dispatch_device(device.pk, now=now) == [t.pk for t in tasks[1:4]]  # 3 × 1,000 fit the 3,000
    # A reading older than SCHEDULER_READING_MAX_AGE_SECONDS is no reading: the ledger alone decides.
    later = now + timedelta(seconds=60)
    assert dispatcher.dispatch_device(device.pk, now=later) == [t.pk for t in tasks[4:6]]


def test_a_paused_queue_device_or_backend_starts_nothing_until_resumed(project, make_device, make_backend,
                                                                      olga, tmp_path):
    device = make_device()
    backend = make_backend(device, models={"m": {"load_mb": 0, "request_mb": 100}})
    loaded = submit(project, tmp_path)
    dispatcher.dispatch_device(device.pk)
    work(loaded)
    for target in ({}, {"device": device}, {"backend": backend}):
        services.control_set(project=project, user=olga, paused=True, reason="maintenance", **target)
        task = submit(project, tmp_path)
        assert dispatcher.dispatch_device(device.pk) == []
        services.control_set(project=project, user=olga, paused=False, reason="done", **target)
        assert dispatcher.dispatch_device(device.pk) == [task.pk]
    audits = AuditEvent.objects.filter(action="scheduler.control_set")
    assert audits.count() == 6
    assert {a.after["reason"] for a in audits} == {"maintenance", "done"}
    assert {a.actor_repr for a in audits} == {"olga"}


def test_a_finished_attempt_admits_what_it_freed_on_its_device(project, make_device, make_backend, tmp_path,
                                                               settings, django_capture_on_commit_callbacks):
    settings.SCHEDULER_DISPATCH_ON_FINISH = True
    device = make_device()
    make_backend(device, models={"m": {"load_mb": 0, "request_mb": 100}}, concurrency=1)
    first, second = submit(project, tmp_path, tag="1"), submit(project, tmp_path, tag="2")
    assert dispatcher.dispatch_device(device.pk) == [first.pk]
    with django_capture_on_commit_callbacks(execute=False) as sent:
        assert work(first) == "succeeded"
    assert states(second) == ["admitted"]  # the finishing worker admitted it, no wake-up needed
    assert len(sent) >= 1  # its message (sent after the commit)


def test_throttle_spaces_starts_on_a_device_and_on_a_backend(project, make_device, make_backend, olga, tmp_path):
    device = make_device()
    backend = make_backend(device, models={"m": {"load_mb": 0, "request_mb": 10}})
    warm = submit(project, tmp_path)
    dispatcher.dispatch_device(device.pk)
    work(warm)
    base = timezone.now() + timedelta(seconds=5)
    for i, target in enumerate(({"device": device}, {"backend": backend})):
        services.control_set(project=project, user=olga, throttle_ms=1000, reason="slow down", **target)
        tasks = [submit(project, tmp_path) for _ in range(3)]
        t0 = base + timedelta(seconds=10 * i)
        assert dispatcher.dispatch_device(device.pk, now=t0) == [tasks[0].pk]
        assert dispatcher.dispatch_device(device.pk, now=t0 + timedelta(milliseconds=999)) == []
        assert dispatcher.dispatch_device(device.pk, now=t0 + timedelta(milliseconds=1000)) == [tasks[1].pk]
        assert dispatcher.dispatch_device(device.pk, now=t0 + timedelta(milliseconds=2000)) == [tasks[2].pk]
        services.control_set(project=project, user=olga, throttle_ms=0, reason="", **target)


@pytest.mark.parametrize("on", ["device", "backend"])
def test_a_throttle_set_after_a_start_counts_from_that_start(project, make_device, make_backend, olga, tmp_path, on):
    device = make_device()
    backend = make_backend(device, models={"m": {"load_mb": 0, "request_mb": 10}})
    warm = submit(project, tmp_path)
    dispatcher.dispatch_device(device.pk)
    work(warm)
    t0 = timezone.now() + timedelta(seconds=5)
    first = submit(project, tmp_path)
    assert dispatcher.dispatch_device(device.pk, now=t0) == [first.pk]  # unthrottled: no last start kept
    services.control_set(project=project, user=olga, throttle_ms=1000, reason="slow down",
                         **({"device": device} if on == "device" else {"backend": backend}))
    second = submit(project, tmp_path)
    assert dispatcher.dispatch_device(device.pk, now=t0 + timedelta(milliseconds=500)) == []
    assert dispatcher.dispatch_device(device.pk, now=t0 + timedelta(milliseconds=1100)) == [second.pk]


def test_a_backend_runs_at_most_its_concurrency(project, make_device, make_backend, tmp_path):
    device = make_device()
    make_backend(device, models={"m": {"load_mb": 0, "request_mb": 10}}, concurrency=2)
    tasks = [submit(project, tmp_path) for _ in range(4)]
    dispatcher.dispatch_device(device.pk)
    work(tasks[0])
    assert dispatcher.dispatch_device(device.pk) == [tasks[1].pk, tasks[2].pk]
    assert dispatcher.dispatch_device(device.pk) == []


def test_idle_models_are_unloaded_least_recently_used_first_and_free_only_once_unloaded(
        project, make_device, make_backend, tmp_path):
    device = make_device()  # 10,000 usable
    make_backend(device, models={"a": {"load_mb": 4000, "request_mb": 100}, "b": {"load_mb": 4000, "request_mb": 100},
                                 "c": {"load_mb": 4000, "request_mb": 100}})
    for model in ("a", "b"):
        task = submit(project, tmp_path, model=model)
        dispatcher.dispatch_device(device.pk)
        work(task)
    LoadedModel.objects.filter(model="b").update(last_used_at=timezone.now() - timedelta(minutes=5))  # b: older
    task_c = submit(project, tmp_path, model="c")
    assert dispatcher.dispatch_device(device.pk) == []  # 8,000 held: c's load does not fit
    assert dict(LoadedModel.objects.values_list("model", "state")) == {"a": "loaded", "b": "unloading"}
    assert dispatcher.dispatch_device(device.pk) == []  # b still holds its memory while it unloads
    executor.unload(LoadedModel.objects.get(model="b").pk)
    assert dispatcher.dispatch_device(device.pk) == [task_c.pk]
    assert dict(LoadedModel.objects.values_list("model", "state")) == {"a": "loaded", "c": "loading"}


def test_a_big_task_waiting_past_the_bound_holds_the_device_and_small_ones_then_follow(
        project, make_device, make_backend, tmp_path, settings):
    settings.SCHEDULER_STARVATION_SECONDS = 30
    device = make_device()
    make_backend(device, models={"m": {"load_mb": 0, "request_mb": 1000}})
    warm = submit(project, tmp_path)
    dispatcher.dispatch_device(device.pk)
    work(warm)
    running = [submit(project, tmp_path) for _ in range(6)]  # 6,000 of 10,000
    dispatcher.dispatch_device(device.pk)
    big = submit(project, tmp_path, memory_mb=8000)
    small = [submit(project, tmp_path) for _ in range(2)]
    now = timezone.now()
    assert dispatcher.dispatch_device(device.pk, now=now) == [s.pk for s in small]  # backfill while it is young
    late = now + timedelta(seconds=31)
    more = submit(project, tmp_path)
    assert dispatcher.dispatch_device(device.pk, now=late) == []  # the big one holds the device now
    for t in running + small:
        work(t)
    assert dispatcher.dispatch_device(device.pk, now=late) == [big.pk, more.pk]


def test_a_duplicated_message_runs_a_task_once(project, make_device, make_backend, tmp_path):
    device = make_device()
    make_backend(device)
    task = submit(project, tmp_path, tag="once")
    dispatcher.dispatch_device(device.pk)
    task.refresh_from_db()
    assert executor.run(task.pk, task.generation) == "succeeded"
    assert executor.run(task.pk, task.generation) == "nothing"
    assert executor.run(task.pk, task.generation - 1) == "nothing"
    assert done_tags(tmp_path) == ["once"]


def test_a_cancelled_queued_task_never_starts(project, make_device, make_backend, olga, tmp_path):
    device = make_device()
    make_backend(device)
    queued, admitted = submit(project, tmp_path, tag="q"), submit(project, tmp_path, tag="a")
    services.cancel(task=queued, user=olga, reason="not needed")
    dispatcher.dispatch_device(device.pk)
    admitted.refresh_from_db()
    old_generation = admitted.generation
    services.cancel(task=admitted, user=olga, reason="wrong input")
    assert executor.run(admitted.pk, old_generation) == "nothing"  # its message was already sent
    assert states(queued, admitted) == ["cancelled", "cancelled"]
    assert done_tags(tmp_path) == []
    assert dispatcher.held_mb(device.pk) == 0  # the load its admission asked for went with it
    assert LoadedModel.objects.count() == 0
    with pytest.raises(ApiError) as err:
        services.cancel(task=queued, user=olga)
    assert err.value.error_code == "task_closed" and err.value.status_code == 409


def test_submission_refuses_a_model_no_backend_serves_and_a_task_no_drained_device_could_hold(
        project, make_device, make_backend, tmp_path):
    make_backend(make_device())
    with pytest.raises(ApiError) as err:
        submit(project, tmp_path, model="nope")
    assert err.value.error_code == "model_not_served"
    with pytest.raises(ApiError) as err:
        submit(project, tmp_path, memory_mb=8001)  # + 2,000 to load: 10,001 > 10,000
    assert err.value.error_code == "exceeds_device" and err.value.details["usable_mb"] == 10_000
    assert QueueTask.objects.count() == 0


def test_redirect_of_a_queued_task_moves_it(project, make_device, make_backend, olga, tmp_path):
    b0 = make_backend(make_device("gpu0"), name="b0")
    b1 = make_backend(make_device("gpu1"), name="b1")
    task = submit(project, tmp_path, backend="b0")
    services.redirect(task=task, backend=b1, user=olga, reason="gpu0 is hot")
    task.refresh_from_db()
    assert (task.backend_id, task.device.name, task.state, task.redirects) == (b1.pk, "gpu1", "queued", 1)
    assert dispatcher.dispatch_device(b0.device_id) == []
    assert dispatcher.dispatch_device(b1.device_id) == [task.pk]
    assert work(task) == "succeeded"
    assert [e.event for e in task.history.all()] == ["submitted", "redirected", "admitted", "started", "succeeded"]


@pytest.mark.django_db(transaction=True)
def test_cancel_and_redirect_of_a_running_task_stop_it_and_its_work_is_done_once(
        project, make_device, make_backend, olga, tmp_path, settings):
    if connection.vendor == "sqlite":  # a worker thread beside the test: shared-cache table locks fail at once
        pytest.skip("a worker thread and the test's reads on SQLite's shared in-memory database collide")
    settings.SCHEDULER_HEARTBEAT_SECONDS = 0.05
    b0 = make_backend(make_device("gpu0"), name="b0")
    b1 = make_backend(make_device("gpu1"), name="b1")
    to_cancel = submit(project, tmp_path, tag="cancelled", backend="b0", task_input={"seconds": 30})
    to_move = submit(project, tmp_path, tag="moved", backend="b0", task_input={"seconds": 30})
    dispatcher.dispatch_device(b0.device_id)
    to_cancel.refresh_from_db()
    ends = {}
    worker = threading.Thread(target=lambda: ends.update(c=executor.run(to_cancel.pk, to_cancel.generation)))
    worker.start()
    _until(lambda: states(to_cancel) == ["running"])
    services.cancel(task=to_cancel, user=olga, reason="runaway")
    worker.join(10)
    assert ends == {"c": "cancelled"} and states(to_cancel) == ["cancelled"]
    work(to_cancel)  # nothing is left to claim
    dispatcher.dispatch_device(b0.device_id)
    to_move.refresh_from_db()
    worker = threading.Thread(target=lambda: ends.update(m=executor.run(to_move.pk, to_move.generation)))
    worker.start()
    _until(lambda: states(to_move) == ["running"])
    services.redirect(task=to_move, backend=b1, user=olga, reason="move it")
    worker.join(10)
    to_move.refresh_from_db()
    assert ends["m"] == "redirected" and (to_move.state, to_move.backend_id) == ("queued", b1.pk)
    QueueTask.objects.filter(pk=to_move.pk).update(input={**to_move.input, "seconds": 0})
    assert dispatcher.dispatch_device(b1.device_id) == [to_move.pk]
    assert work(to_move) == "succeeded"
    assert done_tags(tmp_path) == ["moved"]  # once: the stopped attempt on b0 never finished its work
    assert [(e.event, e.backend) for e in to_move.history.all()] == [
        ("submitted", "b0"), ("admitted", "b0"), ("started", "b0"), ("redirect_requested", "b0"),
        ("redirected", "b1"), ("admitted", "b1"), ("started", "b1"), ("succeeded", "b1")]


def _until(predicate, timeout=10.0):
    """Wait for ``predicate``. A read that meets a worker thread's write on SQLite's shared in-memory test
    database fails at once ("table is locked": shared-cache locks do not wait); it is read again."""
    end = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_lost_worker_is_retried_under_a_new_generation_then_failed(project, make_device, make_backend, tmp_path):
    device = make_device()
    make_backend(device)
    task = submit(project, tmp_path, max_attempts=2)
    for attempt in (1, 2):
        dispatcher.dispatch_device(device.pk)
        task.refresh_from_db()
        claimed = executor.claim(task.pk, task.generation)  # the worker claims, then dies
        assert claimed.attempts == attempt
        QueueTask.objects.filter(pk=task.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
        executor.sweep()
        assert executor.finish(claimed, claimed.generation, outcome="succeeded") == "lost"  # too late: not its own
    task.refresh_from_db()
    assert (task.state, task.error_code, task.attempts) == ("failed", "worker_lost", 2)
    assert [e.event for e in task.history.all()].count("retried") == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 6000), min_size=1, max_size=30), finishing=st.lists(st.booleans(), min_size=30,
                                                                                         max_size=30))
def test_the_ledger_never_exceeds_a_device_over_random_sizes(project, make_device, make_backend, tmp_path, sizes,
                                                              finishing):
    QueueTask.objects.all().delete()
    LoadedModel.objects.all().delete()
    Backend.objects.all().delete()
    Device.objects.all().delete()
    d0, d1 = make_device("gpu0", memory_mb=8512), make_device("gpu1", memory_mb=12_512)
    models = {"x": {"load_mb": 1500, "request_mb": 0}, "y": {"load_mb": 500, "request_mb": 0}}
    make_backend(d0, name="b0", models=models, concurrency=4)
    make_backend(d1, name="b1", models=models, concurrency=4)
    tasks = [submit(project, tmp_path, model="xy"[i % 2], memory_mb=min(size, 6000)) for i, size in enumerate(sizes)]
    for step in range(60):
        for device in (d0, d1):
            dispatcher.dispatch_device(device.pk)
            assert dispatcher.held_mb(device.pk) <= device.usable_mb
        holding = list(QueueTask.objects.filter(state__in=QueueTask.HOLDING).order_by("pk"))
        for i, task in enumerate(holding):
            if finishing[(step + i) % len(finishing)] or step % 5 == 4:
                work(task)
        if not QueueTask.objects.exclude(state__in=QueueTask.TERMINAL).exists():
            break
    assert set(states(*tasks)) == {"succeeded"}
