#!/usr/bin/env python3
"""The GPU queue's dispatcher under real workers (run by bench/queue.sh, which starts them).

Three figures, on one declared GPU large enough that memory never holds a task back and a ``sleep`` handler
backend running trivial tasks (0 s):

* **overhead**: one task at a time, from the dispatcher's admission decision (``admitted_at``: the moment
  its plan was made, inside the admission's transaction) to the worker's start (``started_at``, its claim):
  the rest of the transaction and its commit, Redis, the worker's prefetch and its claim. Also submit →
  admitted (the wake-up and the admission).
* **burst**: --burst tasks queued on a paused backend, then the backend resumed (an operator's control);
  tasks run per second from the resume to the last finish (the queue's throughput with trivial work,
  GPU_WORKER_CONCURRENCY worker processes), and how long the submissions took.
* **sockets**: --sockets agents each hold ``/ws/queue/tasks/{id}`` open on the web process (a minimal
  WebSocket client, in a process of its own so that the operator's side here never delays its clock)
  while their tasks are moved, run and end; for every message, its arrival against the moment the state it
  shows was written (admitted_at, started_at, finished_at): a state change to its WebSocket message.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402

django.setup()

from django.utils import timezone  # noqa: E402

from apps.projects import services as projects  # noqa: E402
from apps.projects.models import Project  # noqa: E402
from apps.scheduler import services  # noqa: E402
from apps.scheduler.models import QueueTask  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 2)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 0.5), "p95": pct(values, 0.95), "p99": pct(values, 0.99),
            "max": round(max(values), 2), "mean": round(statistics.fmean(values), 2)}


def ms(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() * 1000


def wait_done(ids: list[int], timeout: float = 600) -> None:
    """Until every task succeeded. The ids are one submitter's run (nothing else submits in between): counted
    by their range, every 5 ms for one task and every 100 ms for a batch (not a list of thousands of ids
    every few ms: the bench must not take the CPU it measures)."""
    deadline, low, high = time.monotonic() + timeout, min(ids), max(ids)
    pause = 0.005 if len(ids) == 1 else 0.1
    while left := QueueTask.objects.filter(pk__gte=low, pk__lte=high).exclude(state="succeeded").count():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {left} tasks unfinished")
        time.sleep(pause)


class Socket:
    """Just enough of a WebSocket client (RFC 6455) to read text frames the server sends."""

    def __init__(self, url: str, path: str, key: str):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        nonce = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Authorization: Bearer {key}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head.decode(errors="replace"))

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def receive(self) -> tuple[int, bytes]:
        first, second = self._exact(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self._exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self._exact(8), "big")
        return first & 0x0F, self._exact(length)


def overhead(project, n: int) -> dict:
    admit_to_start, submit_to_admit = [], []
    for _ in range(n):
        task = services.submit(project=project, kind="custom", model="trivial", backend="trivial-1",
                               task_input={"seconds": 0}).task
        wait_done([task.pk])
        task.refresh_from_db()
        admit_to_start.append(ms(task.admitted_at, task.started_at))
        submit_to_admit.append(ms(task.created_at, task.admitted_at))
    return {"admitted_to_started_ms": summary(admit_to_start), "submitted_to_admitted_ms": summary(submit_to_admit)}


def burst(project, n: int) -> dict:
    """Queue ``n`` tasks on the paused burst backend, then resume it: its run rate from the resume."""
    backend = project_backend(project, "burst")
    started = time.perf_counter()
    ids = [services.submit(project=project, kind="custom", model="trivial", backend="burst",
                           task_input={"seconds": 0}).task.pk
           for _ in range(n)]
    submitted_s = time.perf_counter() - started
    resumed = timezone.now()
    services.control_set(project=project, user=bench_operator(project), backend=backend, paused=False,
                         reason="bench")
    wait_done(ids)
    rows = QueueTask.objects.filter(pk__in=ids)
    last = max(r.finished_at for r in rows)
    span = (last - resumed).total_seconds()
    return {"tasks": n, "submit_per_s": round(n / submitted_s, 1), "run_per_s_from_resume": round(n / span, 1),
            "resume_to_last_finish_s": round(span, 2),
            "admitted_to_started_ms": summary([ms(r.admitted_at, r.started_at) for r in rows]),
            "queued_to_admitted_after_resume_ms": summary([ms(max(r.queued_at, resumed), r.admitted_at)
                                                           for r in rows])}


def _listen_all(url: str, key_raw: str, ids: list[str], conn) -> None:
    """In a process of its own: open every socket, say so, then note each message's arrival and state."""
    received: dict[str, list[tuple[float, str]]] = {i: [] for i in ids}
    opened = threading.Barrier(len(ids) + 1)

    def listen(public_id: str) -> None:
        ws = Socket(url, f"/ws/queue/tasks/{public_id}", key_raw)
        ws.receive()  # its state now (queued)
        opened.wait()
        while True:
            opcode, data = ws.receive()
            if opcode == 8:
                return
            received[public_id].append((time.time(), json.loads(data)["state"]))

    threads = [threading.Thread(target=listen, args=(i,), daemon=True) for i in ids]
    for t in threads:
        t.start()
    opened.wait()
    conn.send("open")
    for t in threads:
        t.join(120)
    conn.send(received)


def sockets(project, url: str, key_raw: str, key, n: int) -> dict:
    import multiprocessing

    tasks = [services.submit(project=project, kind="custom", model="trivial", key=key,
                             task_input={"seconds": 0.2}, backend="paused").task for _ in range(n)]
    ours, theirs = multiprocessing.Pipe()
    listener = multiprocessing.get_context("spawn").Process(
        target=_listen_all, args=(url, key_raw, [t.public_id for t in tasks], theirs))
    listener.start()
    assert ours.recv() == "open"
    # Every socket is open: move the tasks to the running backend (the redirect is a state change too).
    target = project_backend(project, "trivial-1")
    for t in tasks:
        services.redirect(task=t, backend=target, user=bench_operator(project), reason="bench")
    received = ours.recv()
    listener.join(30)
    latencies, by_state = [], {}
    for t in tasks:
        row = QueueTask.objects.get(pk=t.pk)
        written = {"admitted": row.admitted_at, "running": row.started_at, "succeeded": row.finished_at}
        for at, state in received[t.public_id]:
            if state in written and written[state] is not None:
                latency = (at - written[state].timestamp()) * 1000
                latencies.append(latency)
                by_state.setdefault(state, []).append(latency)
    return {"sockets": n, "messages": len(latencies), "state_change_to_message_ms": summary(latencies),
            **{f"{state}_ms": summary(values) for state, values in by_state.items()}}


def project_backend(project, name):
    from apps.scheduler.models import Backend

    return Backend.objects.get(project=project, name=name)


def bench_operator(project):
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="bench-operator")
    projects.role_grant(project=project, user=user, role="operator", actor=None)
    return user


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--overhead", type=int, default=200)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    project = Project.objects.filter(slug="bench").first() or projects.project_create(slug="bench", actor=None)
    device = services.device_create(project=project, actor=None, name="bench0", gpu="declared:bench0",
                                    memory_mb=1_000_000, headroom_mb=0)
    needs = {"trivial": {"load_mb": 0, "request_mb": 1}}
    services.backend_create(project=project, actor=None, name="trivial-1", device=device, kind="handler",
                            handler="sleep", model_memory=needs, concurrency=int(os.environ.get(
                                "GPU_WORKER_CONCURRENCY", "4")))
    for name in ("paused", "burst"):
        held = services.backend_create(project=project, actor=None, name=name, device=device, kind="handler",
                                       handler="sleep", model_memory=needs, concurrency=int(os.environ.get(
                                           "GPU_WORKER_CONCURRENCY", "4")))
        services.control_set(project=project, user=bench_operator(project), backend=held, paused=True,
                             reason="bench")
    key, raw = projects.api_key_create(project=project, name="bench", scopes=["queue"], actor=None)
    warm = services.submit(project=project, kind="custom", model="trivial", backend="trivial-1",
                               task_input={"seconds": 0}).task
    wait_done([warm.pk])
    result = {"at": timezone.now().isoformat(), "cpus": os.cpu_count(),
              "worker_processes": int(os.environ.get("GPU_WORKER_CONCURRENCY", "4")),
              "overhead": overhead(project, args.overhead), "burst": burst(project, args.burst),
              "sockets": sockets(project, args.url, raw, key, args.sockets)}
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
