"""The admission rule on its own (``apps.scheduler.admission.plan``), as a Hypothesis property: over random
devices, backends, model sizes, task sizes and priorities, with tasks finishing at random, what admitted
tasks and loaded models hold never exceeds the device's usable memory, an admission never takes more than
the live reading offers, one load at a time happens per device, a backend never runs more than its
concurrency, and every task that fits on a drained device is admitted in the end (none starves)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from apps.scheduler.admission import BackendView, DeviceView, Loaded, Waiting, plan

T0 = datetime(2026, 12, 1, tzinfo=UTC)


@st.composite
def worlds(draw):
    usable = draw(st.integers(1_000, 80_000))
    n_backends = draw(st.integers(1, 3))
    backends = {}
    for b in range(1, n_backends + 1):
        models = {f"m{b}{i}": {"load_mb": draw(st.integers(0, usable // 2)),
                               "request_mb": draw(st.integers(0, usable // 4))}
                  for i in range(draw(st.integers(1, 3)))}
        backends[b] = (models, draw(st.integers(1, 4)))
    tasks = []
    for i in range(draw(st.integers(1, 40))):
        b = draw(st.sampled_from(sorted(backends)))
        model = draw(st.sampled_from(sorted(backends[b][0])))
        need = backends[b][0][model]
        extra = draw(st.integers(0, max(0, usable - need["load_mb"] - need["request_mb"])))
        tasks.append((i + 1, b, model, need["request_mb"] + extra, draw(st.integers(-5, 5)),
                      draw(st.integers(0, 20))))  # id, backend, model, memory, priority, arrives at step
    other = draw(st.one_of(st.none(), st.integers(0, usable // 3)))  # memory other processes hold
    finish = draw(st.lists(st.booleans(), min_size=64, max_size=64))
    return usable, backends, tasks, other, finish


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_admission_never_overcommits_and_starves_no_one(world):
    note(repr(world))
    usable, backend_specs, tasks, other, finish = world
    running: dict[int, tuple[int, str, int]] = {}  # task id → (backend, model, memory)
    loaded: dict[tuple[int, str], Loaded] = {}
    admitted: set[int] = set()
    last_step = 400
    for step in range(last_step):
        now = T0 + timedelta(seconds=step)
        # Workers: loads finish, unloads finish, some running tasks end (all of them every 8th step).
        for key in [k for k, m in loaded.items() if m.state == "unloading"]:
            del loaded[key]
        for m in loaded.values():
            if m.state == "loading":
                m.state = "loaded"
        for i, tid in enumerate(sorted(running)):
            if step % 8 == 7 or finish[(step + i) % len(finish)]:
                b, model, _ = running.pop(tid)
                loaded[(b, model)].last_used_at = now
        held_tasks = sum(mem for _, _, mem in running.values())
        held_models = sum(m.memory_mb for m in loaded.values())
        assert held_tasks + held_models <= usable
        live = None if other is None else usable - held_tasks - held_models - other
        for m in loaded.values():
            m.busy = any((b, model) == (m.backend_id, m.model) for b, model, _ in running.values())
        views = {b: BackendView(id=b, model_memory=spec[0], concurrency=spec[1],
                                active=sum(1 for rb, _, _ in running.values() if rb == b))
                 for b, spec in backend_specs.items()}
        waiting = [Waiting(id=tid, backend_id=b, model=model, memory_mb=mem, priority=prio,
                           queued_at=T0 + timedelta(seconds=arrives))
                   for tid, b, model, mem, prio, arrives in tasks if arrives <= step and tid not in admitted]
        if not waiting and not running and all(arrives <= step for *_, arrives in tasks):
            break
        device = DeviceView(usable_mb=usable, held_tasks_mb=held_tasks, loaded={k: Loaded(**vars(m)) for k, m in
                                                                                   loaded.items()},
                            live_free_mb=live)
        out = plan(device, views, waiting, now, aging_seconds=30, starvation_seconds=20)
        by_id = {w.id: w for w in waiting}
        taken = 0
        loads = 0
        for tid, load in out.admit:
            w = by_id[tid]
            assert tid not in admitted
            key = (w.backend_id, w.model)
            if load is not None:
                assert key not in loaded, "a load of a model already loaded"
                loaded[key] = Loaded(w.backend_id, w.model, load, "loading", now, busy=True)
                loads += 1
            else:
                assert loaded[key].state == "loaded"
            running[tid] = (w.backend_id, w.model, w.memory_mb)
            admitted.add(tid)
            taken += w.memory_mb + (load or 0)
        for key in out.evict:
            assert loaded[key].state == "loaded" and not loaded[key].busy, "evicted a model in use"
            loaded[key].state = "unloading"
        assert loads <= 1 and sum(m.state == "loading" for m in loaded.values()) <= 1, "one load at a time"
        assert sum(mem for _, _, mem in running.values()) + sum(m.memory_mb for m in loaded.values()) <= usable
        if live is not None:
            assert taken <= max(live, 0), "admitted more than the live reading offered"
        for b, spec in backend_specs.items():
            assert sum(1 for rb, _, _ in running.values() if rb == b) <= spec[1]
    fits_drained = {tid for tid, b, model, mem, _, _ in tasks
                    if mem + backend_specs[b][0][model]["load_mb"] <= usable - (other or 0)}
    assert fits_drained <= admitted, f"starved: {sorted(fits_drained - admitted)}"
