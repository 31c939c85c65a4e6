"""Benchmarks of the call boundary against a running server (bench/gateway.sh starts one):

  reserve   reservation latency at --concurrency clients (each: reserve, then settle or release)
  overhead  the gateway's added latency at concurrency 1: the same local upstream called directly
            and through the gateway, not streamed (p50/p99) and streamed (time to first token)
  rps       requests per second through the gateway (one web process) at --concurrency
  burst     --clients calls at once against a budget that holds exactly --calls of them: how many
            were served (LiteLLM's proxy served all 64 of a 20-call budget on this machine kind)

Prints one JSON object per run (and appends it to --json-out)."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

MESSAGES = [{"role": "user", "content": "Say five words."}]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 3)


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "mean_ms": round(statistics.fmean(ms), 3), "max_ms": round(max(ms), 3)}


CLIENTS_PER_POOL = 8  # httpx's pool costs grow with the square of its connections: a pool per 8 clients


def client_pools(a, n: int, **kw) -> list[httpx.AsyncClient]:
    """``n`` clients' connections in pools of at most CLIENTS_PER_POOL (one large pool would make the
    benchmark's own client the bottleneck: 190 calls/s at most at 64 connections, ~880 at 8)."""
    pools = -(-n // CLIENTS_PER_POOL)
    per = -(-n // pools)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    return [httpx.AsyncClient(base_url=a.url, headers={"Authorization": f"Bearer {a.key}"}, limits=limits, **kw)
            for _ in range(pools)]


async def reserve(a) -> dict:
    latencies: list[float] = []
    refused = 0
    pools = client_pools(a, a.concurrency, timeout=30)

    async def worker(n: int) -> None:
        nonlocal refused
        client = pools[n % len(pools)]
        for i in range(a.requests // a.concurrency):
            body = {"estimated_cost_usd": "0.001", "agent": f"agent-{n % 8}", "end_user": f"u-{i % 50}"}
            t0 = time.perf_counter()
            r = await client.post("/api/v1/budget/reservations", json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code == 402:
                refused += 1
                continue
            r.raise_for_status()
            rid = r.json()["id"]
            if i % 4:
                await client.post(f"/api/v1/budget/reservations/{rid}/settle", json={"cost_usd": "0.0005"})
            else:
                await client.post(f"/api/v1/budget/reservations/{rid}/release")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(a.concurrency)))
    wall = time.perf_counter() - t0
    for client in pools:
        await client.aclose()
    return {"bench": "reserve", "concurrency": a.concurrency, "refused": refused,
            "reservations_per_s": round(len(latencies) / wall, 1), **summary(latencies)}


async def _timed_calls(client: httpx.AsyncClient, url: str, n: int, stream: bool) -> list[float]:
    out = []
    body = {"model": a_model, "messages": MESSAGES, "max_tokens": 16, "stream": stream}
    for _ in range(n):
        t0 = time.perf_counter()
        if stream:
            first = None
            async with client.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if first is None and '"content":"tok' in line.replace(" ", ""):
                        first = (time.perf_counter() - t0) * 1000  # time to first token
            out.append(first)
        else:
            r = await client.post(url, json=body)
            r.raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
    return out


a_model = "gpt-4o"


async def overhead(a) -> dict:
    result = {"bench": "overhead", "requests": a.requests}
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {a.key}"}) as client:
        direct_url, gw_url = f"{a.upstream}/v1/chat/completions", f"{a.url}/gateway/v1/chat/completions"
        for stream in (False, True):
            name = "streamed_ttft" if stream else "not_streamed"
            await _timed_calls(client, direct_url, 50, stream)  # warm both paths
            await _timed_calls(client, gw_url, 50, stream)
            direct, through = [], []
            for _ in range(a.requests // 100):  # interleaved: both sides see the same machine
                direct += await _timed_calls(client, direct_url, 50, stream)
                through += await _timed_calls(client, gw_url, 50, stream)
            result[name] = {"direct": summary(direct), "gateway": summary(through),
                            "added_p50_ms": round(pct(through, 50) - pct(direct, 50), 3),
                            "added_p99_ms": round(pct(through, 99) - pct(direct, 99), 3)}
    return result


async def rps(a) -> dict:
    body = {"model": a_model, "messages": MESSAGES, "max_tokens": 16}
    done = errors = 0
    pools = client_pools(a, a.concurrency, timeout=30)
    stop = time.perf_counter() + a.seconds

    async def worker(client) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            r = await client.post("/gateway/v1/chat/completions", json=body)
            if r.status_code == 200:
                done += 1
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(pools[n % len(pools)]) for n in range(a.concurrency)))
    wall = time.perf_counter() - t0
    for client in pools:
        await client.aclose()
    return {"bench": "rps", "concurrency": a.concurrency, "seconds": round(wall, 2), "ok": done, "errors": errors,
            "requests_per_s": round(done / wall, 1)}


async def burst(a) -> dict:
    limits = httpx.Limits(max_connections=a.clients, max_keepalive_connections=a.clients)
    body = {"model": a_model, "messages": MESSAGES, "max_tokens": 16, "stream": a.stream}
    async with httpx.AsyncClient(base_url=a.url, headers={"Authorization": f"Bearer {a.key}"}, limits=limits,
                                 timeout=60) as client:
        async def one() -> int:
            if a.stream:
                async with client.stream("POST", "/gateway/v1/chat/completions", json=body) as r:
                    await r.aread()
                    return r.status_code
            return (await client.post("/gateway/v1/chat/completions", json=body)).status_code

        codes = await asyncio.gather(*(one() for _ in range(a.clients)))
    return {"bench": "burst", "clients": a.clients, "budget_calls": a.calls, "stream": a.stream,
            "served": codes.count(200), "refused_402": codes.count(402),
            "other": sorted(c for c in codes if c not in (200, 402))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=("reserve", "overhead", "rps", "burst"))
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--upstream", help="the fake upstream's base URL (overhead)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--json-out")
    a = p.parse_args()
    result = asyncio.run({"reserve": reserve, "overhead": overhead, "rps": rps, "burst": burst}[a.bench](a))
    print(json.dumps(result))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
