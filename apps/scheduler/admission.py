"""Admission: which waiting tasks a device starts now, which idle models it unloads to make room.

A pure function of what the dispatcher read inside its transaction (``plan``), so that the rule is
tested on its own (``tests/scheduler/test_admission_property.py``) and applied by ``dispatcher`` under
the device's row lock: the check and the hold are one transaction on the queue of record.

**Memory.** What a device can give is the smaller of the ledger (its usable memory, capacity − headroom,
minus what admitted and running tasks and loaded, loading or unloading models hold) and the live
reading (NVML's free memory − the device's margin, when a fresh reading exists). Compared, never summed:
the ledger is blind to other processes, the reading lags what was just admitted. A device without a
reading is decided by the ledger alone, never read as "zero free". A task needs its request's memory,
plus its model's load memory when the model is not loaded on its backend.

**Order.** By effective priority (priority + one point per ``aging_seconds`` waited), then age. A task
that does not fit is passed over and smaller ones behind it start (backfill), so one big task does not
stall the device; but once it has waited ``starvation_seconds`` it holds the device: nothing behind it
starts until it does (running tasks finish, the memory frees, it fits). Small tasks are never starved for
good either: ageing lifts them above newer work of any priority, and a held device serves the big task
and then them. A task that could not fit even on a drained device is refused at submission; one that
only other processes' memory keeps out does not hold the device (draining ours would not admit it).

**Eviction.** The first task that does not fit unloads idle models of its device (loaded, no task
using them), least recently used first, as many as make it fit, and nothing else starts on the device
this tick. An unloading model keeps holding its memory until its unload is done (and the live reading
shows it free), so the memory counts as free only once it is free. One load at a time per device.

**Controls.** A paused queue, device or backend starts nothing; a throttled device or backend starts at
most one task per ``throttle_ms``; a backend runs at most ``concurrency`` tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class Loaded:
    backend_id: int
    model: str
    memory_mb: int
    state: str  # loading | loaded | unloading
    last_used_at: datetime
    busy: bool  # an admitted or running task uses it


@dataclass
class BackendView:
    id: int
    model_memory: dict
    concurrency: int
    active: int  # admitted + running
    paused: bool = False
    throttle_ms: int = 0
    last_start_at: datetime | None = None
    name: str = ""


@dataclass
class DeviceView:
    usable_mb: int  # capacity − headroom
    held_tasks_mb: int
    loaded: dict[tuple[int, str], Loaded]
    live_free_mb: int | None = None  # NVML's free − the margin, fresh; None: no reading
    paused: bool = False
    throttle_ms: int = 0
    last_start_at: datetime | None = None


@dataclass(frozen=True)
class Waiting:
    id: int
    backend_id: int
    model: str
    memory_mb: int
    priority: int
    queued_at: datetime


@dataclass
class Plan:
    admit: list[tuple[int, int | None]] = field(default_factory=list)  # (task id, load memory; None: loaded)
    evict: list[tuple[int, str]] = field(default_factory=list)  # (backend id, model)
    held_for: int | None = None  # a starving task holding the device
    waits: dict[int, str] = field(default_factory=dict)  # task id → why it waits


def elapsed_ms(now: datetime, then: datetime | None) -> float:
    return float("inf") if then is None else (now - then).total_seconds() * 1000


def effective_priority(task: Waiting, now: datetime, aging_seconds: float) -> float:
    return task.priority + max(0.0, (now - task.queued_at).total_seconds()) // aging_seconds


def plan(device: DeviceView, backends: dict[int, BackendView], waiting: list[Waiting], now: datetime, *,
         aging_seconds: float, starvation_seconds: float) -> Plan:
    out = Plan()
    if device.paused:
        out.waits = dict.fromkeys((t.id for t in waiting), "paused")
        return out
    if device.throttle_ms and elapsed_ms(now, device.last_start_at) < device.throttle_ms:
        out.waits = dict.fromkeys((t.id for t in waiting), "throttled")
        return out
    loaded = dict(device.loaded)
    ledger = device.usable_mb - device.held_tasks_mb - sum(m.memory_mb for m in loaded.values())
    live = device.live_free_mb
    loading = any(m.state == "loading" for m in loaded.values())
    started: set[int] = set()
    order = sorted(waiting, key=lambda t: (-effective_priority(t, now, aging_seconds), t.queued_at, t.id))
    for i, task in enumerate(order):
        b = backends.get(task.backend_id)
        need = b.model_memory.get(task.model) if b is not None else None
        if b is None or b.paused:
            out.waits[task.id] = "paused"
            continue
        if need is None:
            out.waits[task.id] = "model_not_served"
            continue
        if b.active >= b.concurrency:
            out.waits[task.id] = "concurrency"
            continue
        if b.throttle_ms and (b.id in started or elapsed_ms(now, b.last_start_at) < b.throttle_ms):
            out.waits[task.id] = "throttled"
            continue
        if device.throttle_ms and out.admit:
            out.waits.update((t.id, "throttled") for t in order[i:])
            break
        key = (b.id, task.model)
        model = loaded.get(key)
        if model is not None and model.state != "loaded":  # wait for its unload or its load to finish
            out.waits[task.id] = model.state
            continue
        load = None if model is not None else int(need["load_mb"])
        total = task.memory_mb + (load or 0)
        avail = ledger if live is None else min(ledger, live)
        if load is not None and loading:
            out.waits[task.id] = "loading"
        elif total <= avail:
            out.admit.append((task.id, load))
            ledger -= total
            live = None if live is None else live - total
            b.active += 1
            started.add(b.id)
            if model is None:
                loaded[key] = Loaded(b.id, task.model, load, "loading", now, busy=True)
                loading = True
            else:
                model.busy = True
            continue
        else:
            out.waits[task.id] = "memory"
            idle = sorted((m for k, m in loaded.items() if m.state == "loaded" and not m.busy and k != key),
                          key=lambda m: m.last_used_at)
            if load is None or not loading:
                # Memory that models already unloading will free is on its way: evict only beyond it.
                coming = sum(m.memory_mb for m in loaded.values() if m.state == "unloading")
                short, chosen = total - avail - coming, []
                for m in idle:
                    if short <= 0:
                        break
                    chosen.append(m)
                    short -= m.memory_mb
                if short <= 0 and (chosen or coming):
                    for m in chosen:
                        m.state = "unloading"
                        out.evict.append((m.backend_id, m.model))
                    out.waits.update((t.id, "held") for t in order[i + 1:] if t.id not in out.waits)
                    out.held_for = task.id
                    break
        # It waits. Past the starvation bound it holds the device, unless only memory outside the queue
        # (other processes) keeps it out: draining the device would not let it in.
        # Drained, the device would hold this task and its model (loaded already, or its load).
        drained = task.memory_mb + (model.memory_mb if model is not None else load or 0)
        if (now - task.queued_at).total_seconds() >= starvation_seconds and drained <= device.usable_mb and (
                device.live_free_mb is None
                or drained <= device.live_free_mb + device.held_tasks_mb + sum(m.memory_mb for m in device.loaded.values())):
            out.held_for = task.id
            out.waits.update((t.id, "held") for t in order[i + 1:] if t.id not in out.waits)
            break
    return out
