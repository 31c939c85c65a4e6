"""The reservation ledger alone, without HTTP: --threads threads (each its own database connection) call
``budgets.ledger.reserve`` against the same two budgets of one project (so every hold contends on the same
two ledger rows) and settle or release each one, as the reservations API does. Prints the latency of the
reserve (p50/p99) and the reservations per second as one JSON object (appended to --json-out).

    DATABASE_URL=postgres://... bench/ledger.sh [--threads 64 --reservations 20000]

This is the part of a reservation the design controls (one conditional statement on the rows it guards);
what HTTP adds is measured by bench/gateway.py's ``reserve``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from apps.budgets import ledger, services  # noqa: E402
from apps.projects import services as projects  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--reservations", type=int, default=20_000)
    parser.add_argument("--json-out")
    a = parser.parse_args()
    call_command("migrate", verbosity=0)
    project = projects.project_create(slug=f"ledger-{int(time.time())}", name="ledger bench", actor=None)
    services.budget_create(project=project, actor=None, name="project", cap_nanos=10**15)
    services.budget_create(project=project, actor=None, name="soft", hard=False, cap_nanos=10**12)
    latencies: list[list[float]] = [[] for _ in range(a.threads)]
    per_thread = a.reservations // a.threads
    start = threading.Barrier(a.threads + 1)

    def worker(n: int) -> None:
        out = latencies[n]
        try:
            start.wait()
            for i in range(per_thread):
                t0 = time.perf_counter()
                held = ledger.reserve(project_id=project.pk, api_key_id=0, amount=1_000_000, agent=f"a-{n % 8}")
                out.append((time.perf_counter() - t0) * 1000)
                if i % 4:
                    ledger.settle(held.reservation, actual=500_000)
                else:
                    ledger.release(held.reservation)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(a.threads)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x for part in latencies for x in part]
    result = {"bench": "ledger", "vendor": connection.vendor, "threads": a.threads, "reservations": len(ms),
              "reservations_per_s": round(len(ms) / wall, 1), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90),
              "p99_ms": pct(ms, 99), "max_ms": round(max(ms), 3)}
    print(json.dumps(result))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
