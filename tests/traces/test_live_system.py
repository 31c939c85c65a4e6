"""The whole write path as deployed: a real server process accepts over HTTP, its enqueuer thread
sends the projection through Redis, a real Celery worker projects, and the API reads the run back.
Nothing here calls the projection by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from tests import http_client as http

from .test_db_unavailable import _free_port
from .workers import purge_queue, start_worker, worker_database_url

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not (os.environ.get("DATABASE_URL", "").startswith("postgres") and settings.REDIS_URL),
                       reason="needs PostgreSQL and Redis (separate server and worker processes)"),
]


def test_a_run_written_over_http_is_projected_by_a_worker_without_the_sweeper(project, make_key, tmp_path):
    raw = make_key(project)[1]
    purge_queue()
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": worker_database_url(), "DATA_DIR": str(tmp_path / "var")}
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "manage.py", "serve", "--no-worker", "--port", str(port)], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    worker = start_worker(tmp_path, "live", beat=False)  # no beat: only the enqueued task can project
    base = f"http://127.0.0.1:{port}/api/v1"
    headers = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}

    def call(method, path, body=None):
        status, text, _ = http.request(method, base + path, headers=headers, timeout=20,
                                       data=json.dumps(body).encode() if body is not None else None)
        return status, json.loads(text) if text else None

    try:
        deadline = time.monotonic() + 60
        while http.get(f"http://127.0.0.1:{port}/healthz")[0] != 200:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
        assert call("POST", "/runs", {"run_id": "live-1", "agent": "live-bot", "end_user": "u-1"})[0] == 202
        status, body = call("POST", "/runs/live-1/spans", [
            {"span_id": "a", "kind": "llm", "model": "gpt-4o", "usage": {"input_tokens": 7, "output_tokens": 3}},
            {"span_id": "b", "parent_span_id": "a", "kind": "tool", "tool": {"name": "search"}}])
        assert status == 202 and body["span_ids"] == ["a", "b"]
        assert call("POST", "/runs/live-1/finish", {"status": "completed"})[0] == 202

        deadline = time.monotonic() + 60
        while True:
            status, run = call("GET", "/runs/live-1")
            if status == 200 and run["status"] == "completed" and run["span_count"] == 2:
                break
            assert time.monotonic() < deadline, (status, run, (tmp_path / "live.log").read_text()[-3000:])
            time.sleep(0.2)
        assert run["usage"]["input_tokens"] == 7 and run["end_user"] == "u-1"
        assert [(s["span_id"], s["depth"]) for s in run["spans"]] == [("a", 0), ("b", 1)]
        assert run["tool_calls"][0]["name"] == "search"
    finally:
        for proc in (server, worker):
            os.killpg(proc.pid, 15)
        for proc in (server, worker):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        log.close()
