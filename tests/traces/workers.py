"""Real Celery worker processes (with beat where asked) against the test database, for tests about
workers. PostgreSQL and Redis only: a separate process cannot see SQLite's in-memory test database."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def worker_database_url() -> str:
    s = connection.settings_dict
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def start_worker(tmp_path: Path, name: str, *, beat: bool, queues: str = "ingest",
                 env: dict[str, str] | None = None, concurrency: int | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "DATABASE_URL": worker_database_url(), "DATA_DIR": str(tmp_path / "var"),
                "TRACES_LEASE_SECONDS": "4", "TRACES_SWEEP_SECONDS": "1", "TRACES_PROJECTION_BATCH_LIMIT": "20",
                **(env or {})}
    pool = ["-P", "solo"] if concurrency is None else ["-P", "prefork", "-c", str(concurrency),
                                                       "--prefetch-multiplier", "1"]
    cmd = [sys.executable, "-m", "celery", "-A", "controlplane", "worker", "-Q", queues, *pool,
           "--without-mingle", "--without-gossip", "-n", f"{name}@%h", "-l", "INFO"]
    if beat:
        cmd += ["-B"]  # the DatabaseScheduler: the schedule is rows of the test database
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL the worker and its children (beat runs in a child of its own): no goodbye."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        kill_worker(proc)  # the leader is gone; its children (beat) may not be
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for(predicate, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; logs:\n" + "\n".join(
                p.read_text(errors="replace")[-3000:] for p in logs.glob("*.log")))
        time.sleep(0.01)


def purge_queue(name: str = "ingest") -> None:
    """Drop messages a previous test left in a broker queue."""
    from controlplane.celery import app
    with app.connection_for_write() as conn:
        try:
            conn.default_channel.queue_purge(name)
        except Exception:  # noqa: BLE001 - the queue may not exist yet
            pass
