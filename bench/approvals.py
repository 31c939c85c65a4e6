"""From an approver's click to the agent's answer, against a running server (bench/approvals.sh starts one).

``--agents`` approvals are requested, then every agent waits at once on its long-poll
(``GET /api/v1/approvals/{id}?wait=30``); ``--approvers`` people (signed-in sessions) then approve them
one after another over the API. For each approval: the time from sending the approve request (the click)
to the agent's long-poll answering ``approved``. ``--rounds`` rounds. Prints one JSON object (and
appends it to --json-out)."""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

from bench.gateway import client_pools, summary

ARGS = {"order": 1234, "amount": 120, "currency": "EUR"}


async def one_round(a, agents: list[httpx.AsyncClient], people: list[httpx.AsyncClient]
                    ) -> tuple[list[float], list[float]]:
    agent = agents[0]
    ids = []
    for i in range(a.agents):
        r = await agent.post("/api/v1/approvals", json={"action": "payments.refund", "arguments": {**ARGS, "n": i},
                                                        "summary": f"Refund {i}"})
        r.raise_for_status()
        ids.append(r.json()["id"])
    answered: dict[str, float] = {}

    async def wait(n: int, approval_id: str) -> None:
        client = agents[n % len(agents)]
        while True:
            r = await client.get(f"/api/v1/approvals/{approval_id}", params={"wait": 30})
            if r.json()["state"] != "pending":
                answered[approval_id] = time.perf_counter()
                assert r.json()["state"] == "approved", r.text
                return

    waits = [asyncio.create_task(wait(n, i)) for n, i in enumerate(ids)]
    await asyncio.sleep(1.0)  # every agent is waiting (subscribed) before the first click
    clicked: dict[str, float] = {}
    approve_ms: list[float] = []
    queue = list(ids)

    async def approver(client: httpx.AsyncClient) -> None:
        while queue:
            approval_id = queue.pop(0)
            clicked[approval_id] = time.perf_counter()
            r = await client.post(f"/api/v1/approvals/{approval_id}/approve", json={"reason": "bench"})
            approve_ms.append((time.perf_counter() - clicked[approval_id]) * 1000)
            assert r.status_code == 200, r.text

    await asyncio.gather(*(approver(p) for p in people))
    await asyncio.gather(*waits)
    lat = [(answered[i] - clicked[i]) * 1000 for i in ids]
    if a.verbose:
        print("in click order:", [round(x) for x in lat], flush=True)
    return lat, approve_ms


async def main(a) -> dict:
    agents = client_pools(a, a.agents, timeout=60)  # a pool per 8 agents (httpx's cost grows with a pool's size)
    sessions = json.loads(a.sessions)
    csrf = "b" * 32
    people = [httpx.AsyncClient(base_url=a.url, timeout=60, headers={
        "Cookie": f"sessionid={s}; csrftoken={csrf}", "X-CSRFToken": csrf, "Referer": a.url + "/"})
        for s in sessions[:a.approvers]]
    to_answer: list[float] = []
    approve: list[float] = []
    for _ in range(a.rounds):
        got, took = await one_round(a, agents, people)
        to_answer += got
        approve += took
    return {"bench": "approvals.click_to_answer", "agents_waiting": a.agents, "approvers": a.approvers,
            "rounds": a.rounds, "click_to_answer": summary(to_answer), "approve_call": summary(approve)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--sessions", required=True, help="JSON list of session ids of approvers")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--approvers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out")
    p.add_argument("--verbose", action="store_true", help="print each round's latencies in click order")
    a = p.parse_args()
    result = asyncio.run(main(a))
    print(json.dumps(result))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps({**result, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
