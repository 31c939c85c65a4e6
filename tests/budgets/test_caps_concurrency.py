"""The cap holds under a burst: 64 clients over real HTTP make thousands of reservations against caps
that admit a fraction of them, settling, releasing and leaving some to expire, while a sampler reads
the ledger; no hard budget's charged + traced + held ever passes its cap, and every refusal names
one of the budgets that applied. PostgreSQL only (SQLite serialises every write anyway)."""
from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import pytest
import requests
from django.db import connection

from apps.budgets import ledger, services
from apps.budgets.models import BudgetLedger, Reservation

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = 64
PER_CLIENT = 34  # 2,176 reservations
AGENTS = ("a", "b", "c", "d")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a concurrency test of PostgreSQL")
def test_64_clients_never_take_a_hard_budget_past_its_cap(live_server, project, make_key):
    _, raw = make_key(project, scopes=("budget",), name="burst")
    caps = {"project": services.budget_create(project=project, actor=None, name="project", cap_nanos=4 * 10**9)}
    for agent in AGENTS:
        caps[agent] = services.budget_create(project=project, actor=None, name=f"agent-{agent}", scope="agent",
                                             value=agent, cap_nanos=10**9)
    soft = services.budget_create(project=project, actor=None, name="soft", hard=False, cap_nanos=10**9)
    hard_ids = {b.pk: b.cap_nanos for b in caps.values()}
    url = f"{live_server.url}/api/v1/budget/reservations"
    headers = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}
    outcomes: Counter = Counter()
    problems: list = []
    samples = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            for row in BudgetLedger.objects.filter(budget_id__in=hard_ids):
                samples.append(1)
                if row.charged_nanos + row.traced_nanos + row.held_nanos > hard_ids[row.budget_id]:
                    problems.append(("over the cap while running", row.budget_id, row.charged_nanos, row.held_nanos))
            ledger.expire_due()  # the beat's sweep, as it runs beside the traffic
            time.sleep(0.02)
        connection.close()

    def client(n: int):
        rng = random.Random(n)
        session = requests.Session()
        for _ in range(PER_CLIENT):
            agent = rng.choice(AGENTS)
            estimate = rng.randint(10, 120) * 10**6  # $0.010 .. $0.120
            r = session.post(url, headers=headers, timeout=30, data=json.dumps(
                {"estimated_cost_usd": f"{estimate / 1e9:.9f}", "agent": agent, "ttl_seconds": 1}))
            if r.status_code == 402:
                outcomes["refused"] += 1
                named = r.json()["details"]["budget"]["id"]
                if named not in (caps["project"].pk, caps[agent].pk):
                    problems.append(("refusal names a budget that does not apply", named, agent))
                continue
            if r.status_code != 201:
                problems.append(("unexpected answer", r.status_code, r.text[:200]))
                continue
            outcomes["admitted"] += 1
            rid = r.json()["id"]
            roll = rng.random()
            if roll < 0.6:
                actual = rng.randint(0, estimate)
                s = session.post(f"{url}/{rid}/settle", headers=headers, timeout=30,
                                 data=json.dumps({"cost_usd": f"{actual / 1e9:.9f}"}))
                outcomes["settled" if s.status_code == 200 else f"settle {s.status_code}"] += 1
            elif roll < 0.85:
                s = session.post(f"{url}/{rid}/release", headers=headers, timeout=30)
                outcomes["released" if s.status_code == 200 else f"release {s.status_code}"] += 1
            else:
                outcomes["left to expire"] += 1

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.1)  # the last reservations' time to live
    stop.set()
    watcher.join()
    ledger.expire_due()

    assert not problems, problems[:5]
    assert outcomes["admitted"] + outcomes["refused"] == CLIENTS * PER_CLIENT
    assert outcomes["refused"] > outcomes["admitted"] / 4, outcomes  # the caps admit a fraction
    assert outcomes["settled"] and outcomes["released"] and outcomes["left to expire"], outcomes
    assert len(samples) > 50
    # At the end: every cap holds, nothing is held, and each row is the sum of its reservations.
    rows = {row.pk: row for row in BudgetLedger.objects.all()}
    expected = dict.fromkeys(rows, 0)
    for state, charged, ledger_ids in Reservation.objects.values_list("state", "charged_nanos", "ledger_ids"):
        assert state != "held"
        for pk in ledger_ids:
            expected[pk] += charged or 0
    for pk, row in rows.items():
        assert (row.charged_nanos, row.held_nanos) == (expected[pk], 0), row
        if row.budget_id in hard_ids:
            assert row.charged_nanos <= hard_ids[row.budget_id]
    soft_row = next(r for r in rows.values() if r.budget_id == soft.pk)
    assert soft_row.reservations == outcomes["admitted"]  # a soft budget holds every admitted call
