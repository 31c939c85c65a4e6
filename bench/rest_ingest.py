#!/usr/bin/env python3
"""REST ingest benchmark: concurrent agents writing runs through /api/v1, then the time until every span
reads back through the API.

Each simulated agent run is: POST /runs, POST /runs/{id}/spans in requests of --batch spans (LLM calls
with usage and messages of a few hundred bytes, tool calls with arguments and results, about 1 KB per
span as JSON), POST /runs/{id}/finish. --concurrency threads share the runs, each on its own keep-alive
connection. Standard library only; refuses non-loopback URLs.

    python bench/rest_ingest.py --url http://127.0.0.1:8000 --key cp_live_... \\
        --runs 200 --spans-per-run 50 --batch 50 --concurrency 8 --json-out out.json

Reports: requests by status, spans accepted per second (client side: the 202s), accept latency
(p50/p90/p99/max of every write request), and the end-to-end figure: seconds from the first request
until the API reports every span stored (summing span_count over the bench's runs, paged), and
spans per second over that time.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse
from collections import Counter
from datetime import UTC, datetime, timedelta


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


class Api:
    def __init__(self, url: str, key: str):
        parts = urllib.parse.urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit("refusing a non-loopback URL")
        self.host, self.port, self.key = parts.hostname, parts.port or 80, key
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def call(self, method: str, path: str, body=None) -> tuple[int, bytes, float]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        for attempt in range(3):
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                text = resp.read()
                return resp.status, text, time.perf_counter() - t0
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                if attempt == 2:
                    return 0, b"", time.perf_counter() - t0
        raise AssertionError("unreachable")


def make_spans(rng: random.Random, run_id: str, n: int, t0: datetime) -> list[dict]:
    spans = [{"span_id": f"{run_id}-0", "kind": "agent", "name": "bench-agent", "start_time": t0.isoformat(),
              "end_time": (t0 + timedelta(seconds=n)).isoformat(), "status": "ok"}]
    for i in range(1, n):
        start = t0 + timedelta(seconds=i)
        end = start + timedelta(milliseconds=rng.randint(50, 900))
        common = {"span_id": f"{run_id}-{i}", "parent_span_id": f"{run_id}-0", "start_time": start.isoformat(),
                  "end_time": end.isoformat()}
        if i % 2:
            spans.append({**common, "kind": "llm", "provider": "openai", "model": "gpt-4o", "status": "ok",
                          "usage": {"input_tokens": rng.randint(100, 4000), "output_tokens": rng.randint(10, 800),
                                    "cache_read_tokens": rng.choice([0, 512, 1024])},
                          "input_messages": [{"role": "user", "content": "Summarise the ticket history. " * 8}],
                          "output_messages": [{"role": "assistant", "content": "The customer reports ... " * 8}]})
        else:
            failed = rng.random() < 0.05
            spans.append({**common, "kind": "tool", "status": "error" if failed else "ok",
                          "tool": {"name": "search_tickets", "call_id": f"c{i}", "arguments": {"q": "refund", "n": i},
                                   "result": None if failed else {"hits": [f"T-{i}", f"T-{i + 1}"]}}})
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True, help="an API key with the ingest and read scopes")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--spans-per-run", type=int, default=50)
    ap.add_argument("--batch", type=int, default=50, help="spans per POST /spans request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verify-timeout", type=float, default=600)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    tag = f"bench-{args.seed}-{int(time.time())}"
    t_base = datetime.now(UTC) - timedelta(hours=1)
    latencies: list[float] = []
    statuses: Counter = Counter()
    accepted_spans = 0
    lock = threading.Lock()
    queue = list(range(args.runs))

    def worker(wid: int) -> None:
        nonlocal accepted_spans
        api = Api(args.url, args.key)
        rng = random.Random(args.seed * 1000 + wid)
        while True:
            with lock:
                if not queue:
                    return
                n = queue.pop()
            run_id = f"{tag}-{n}"
            spans = make_spans(rng, run_id, args.spans_per_run, t_base + timedelta(seconds=n))
            calls = [("POST", "/api/v1/runs", {"run_id": run_id, "agent": tag, "end_user": f"user-{n % 50}",
                                                "input": {"ticket": n}, "started_at": spans[0]["start_time"]}, 0)]
            calls += [("POST", f"/api/v1/runs/{run_id}/spans", spans[i:i + args.batch], len(spans[i:i + args.batch]))
                      for i in range(0, len(spans), args.batch)]
            calls.append(("POST", f"/api/v1/runs/{run_id}/finish", {"status": "completed", "output": {"ok": True}}, 0))
            for method, path, body, count in calls:
                status, text, took = api.call(method, path, body)
                with lock:
                    statuses[status] += 1
                    latencies.append(took)
                    if status == 202:
                        accepted_spans += count

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    send_s = time.perf_counter() - t0

    # End to end: until the API reports every accepted span stored.
    reader = Api(args.url, args.key)
    stored, e2e_s = 0, None
    while time.perf_counter() - t0 < args.verify_timeout:
        stored, runs_seen, cursor = 0, 0, f"/api/v1/runs?agent={tag}&limit=500"
        while cursor:
            status, text, _ = reader.call("GET", cursor)
            if status != 200:
                break
            page = json.loads(text)
            stored += sum(r["span_count"] for r in page["results"])
            runs_seen += len(page["results"])
            nxt = page["next"]
            cursor = urllib.parse.urlsplit(nxt)._replace(scheme="", netloc="").geturl() if nxt else None
        if stored >= accepted_spans:
            e2e_s = time.perf_counter() - t0
            break
        time.sleep(0.2)

    result = {
        "runs": args.runs, "spans_per_run": args.spans_per_run, "batch": args.batch, "concurrency": args.concurrency,
        "requests": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "spans_accepted": accepted_spans, "send_seconds": round(send_s, 2),
        "accepted_spans_per_s": round(accepted_spans / send_s, 1),
        "accept_latency_ms": {k: round(percentile(latencies, p) * 1000, 1)
                              for k, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "spans_read_back": stored,
        "end_to_end_seconds": round(e2e_s, 2) if e2e_s else None,
        "end_to_end_spans_per_s": round(accepted_spans / e2e_s, 1) if e2e_s else None,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    if not accepted_spans or set(statuses) != {202}:
        sys.exit(f"not every write was accepted: {dict(statuses)}")
    if e2e_s is None:
        sys.exit(f"only {stored} of {accepted_spans} spans read back within {args.verify_timeout} s")


if __name__ == "__main__":
    main()
