#!/usr/bin/env python3
"""From a span's accept to its live message on an open run page, measured in a real browser.

Starts the system (``--mode pg``: ``serve --no-worker`` + a Celery worker on PostgreSQL and Redis, as
``make web`` + ``make worker``; ``--mode embedded``: ``make run``), signs an auditor in with Debian's
Chromium (Playwright), opens a run's page and, from the page itself, posts --spans spans one at a time
(--gap seconds apart, so the projection is idle when each arrives). For each it records, on the
browser's clock: the request sent, its 202 (the accept), and the run channel's message naming the span.
Prints the p50 / p95 / max of accept -> message and of send -> message.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/cp_live REDIS_URL=redis://127.0.0.1:6379/14 \\
        python bench/live_latency.py --mode pg
    python bench/live_latency.py --mode embedded
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv/bin/python")
PEOPLE = """
from django.contrib.auth import get_user_model
from apps.projects import services
from apps.projects.models import Project, Role
user = get_user_model().objects.create_user("auditor", password="pw-auditor-123")
services.role_grant(project=Project.objects.get(slug="bench"), user=user, role=Role.AUDITOR, actor=None)
"""
MEASURE = """async ({runId, spans, gap, key}) => {
  const out = [];
  for (let i = 0; i < spans; i++) {
    const spanId = "live-" + i;
    const seen = new Promise(resolve => {
      const on = e => { if ((e.detail.new_spans || []).includes(spanId)) {
        document.removeEventListener("live:message", on); resolve(performance.now()); } };
      document.addEventListener("live:message", on);
    });
    const sent = performance.now();
    const r = await fetch(`/api/v1/runs/${runId}/spans`, {method: "POST", headers: {
      "Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({span_id: spanId, kind: "tool", name: "step", tool: {name: "step"}})});
    const accepted = performance.now();
    if (r.status !== 202) throw new Error("status " + r.status);
    const message = await Promise.race([seen, new Promise(r => setTimeout(() => r(null), 10000))]);
    out.push({sent, accepted, message});
    await new Promise(r => setTimeout(r, gap * 1000));
  }
  return out;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("pg", "embedded"), default="pg")
    p.add_argument("--spans", type=int, default=60)
    p.add_argument("--gap", type=float, default=0.5)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    port = _free_port()
    env = {**os.environ, "DATA_DIR": str(tmp), "PORT": str(port), "ADMIN_PASSWORD": "bench-admin-pw-1",
           "OTLP_GRPC_PORT": str(_free_port())}
    procs = []
    if args.mode == "pg":
        assert env.get("DATABASE_URL", "").startswith("postgres") and env.get("REDIS_URL"), "set DATABASE_URL, REDIS_URL"
        base, name = env["DATABASE_URL"].rsplit("/", 1)
        subprocess.run(["psql", f"{base}/postgres", "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                        "-c", f'CREATE DATABASE "{name}"'], check=True)
        subprocess.run(["redis-cli", "-u", env["REDIS_URL"], "flushdb"], check=True, capture_output=True)
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
        procs.append(subprocess.Popen([PY, "manage.py", "serve", "--no-worker", "--port", str(port)], cwd=ROOT,
                                      env=env, stdout=open(tmp / "web.log", "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        procs.append(subprocess.Popen([str(ROOT / ".venv/bin/celery"), "-A", "controlplane", "worker", "-Q",
                                       "default,ingest", "-l", "WARNING", "--concurrency", "2"], cwd=ROOT, env=env,
                                      stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    else:
        for k in ("DATABASE_URL", "REDIS_URL"):
            env.pop(k, None)
        procs.append(subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=open(tmp / "run.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        base_url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"{base_url}/healthz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        key = subprocess.run([PY, "manage.py", "create_api_key", "--project", "bench", "--scopes", "ingest,read",
                              "--create-project"], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        subprocess.run([PY, "manage.py", "shell", "-c", PEOPLE], cwd=ROOT, env=env, check=True)
        request = urllib.request.Request(f"{base_url}/api/v1/runs", method="POST",
                                         data=json.dumps({"run_id": "live-run", "agent": "bench"}).encode(),
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        assert urllib.request.urlopen(request, timeout=10).status == 202
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"{base_url}/login/")
            page.fill("#id_username", "auditor")
            page.fill("#id_password", "pw-auditor-123")
            page.click("button[type=submit]")
            page.wait_for_url(f"{base_url}/")
            for _ in range(100):
                page.goto(f"{base_url}/runs/bench/live-run/")
                if page.locator("[data-live-ws]").count():
                    break
                time.sleep(0.2)
            page.wait_for_selector("[data-live-state][data-state=open]")
            rows = page.evaluate(MEASURE, {"runId": "live-run", "spans": args.spans, "gap": args.gap, "key": key})
            browser.close()
        lost = sum(1 for r in rows if r["message"] is None)
        after_accept = [r["message"] - r["accepted"] for r in rows if r["message"] is not None]
        after_send = [r["message"] - r["sent"] for r in rows if r["message"] is not None]
        accept = [r["accepted"] - r["sent"] for r in rows]
        print(f"mode {args.mode}: {len(rows)} spans, {lost} without a message within 10 s")
        for label, values in (("send -> 202 (accept)", accept), ("accept -> live message", after_accept),
                              ("send -> live message", after_send)):
            print(f"  {label:24s} p50 {statistics.median(values):7.0f} ms  p95 {_pct(values, .95):7.0f} ms  "
                  f"max {max(values):7.0f} ms")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(0)


if __name__ == "__main__":
    main()
