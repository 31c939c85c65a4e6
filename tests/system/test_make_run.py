"""`make run` is the newcomer's one command: it must serve the admin, the schema and the API, with a real
worker behind it, and stop everything on Ctrl-C. This starts the real command as a subprocess."""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests import http_client as http

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def embedded_env(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "DJANGO_SETTINGS_MODULE"}}
    env.update({"DATA_DIR": str(tmp_path / "var"), "PORT": str(_free_port()), "ADMIN_PASSWORD": "a-long-pw-123",
                "OTLP_GRPC_PORT": str(_free_port())})
    return env


def test_make_run_serves_the_whole_system_and_stops_on_ctrl_c(embedded_env, tmp_path):
    port = embedded_env["PORT"]
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=embedded_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while http.get(f"{base}/healthz")[0] != 200:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, "make run did not serve within 300 s"
            time.sleep(0.5)

        assert http.get(f"{base}/admin/login/")[0] == 200
        status, body = http.get(f"{base}/api/schema/")
        assert status == 200 and b"/api/v1/me" in body
        status, body = http.get(f"{base}/api/v1/me")
        assert status == 401 and b'"not_authenticated"' in body

        made = subprocess.run([str(ROOT / ".venv/bin/python"), "manage.py", "create_api_key", "--project", "demo",
                               "--scopes", "ingest,read", "--create-project"],
                              cwd=ROOT, env=embedded_env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        status, body = http.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and b'"project":"demo"' in body

        # A real Celery worker runs behind it: a task goes through the broker and comes back.
        status, body = http.get(f"{base}/healthz?worker=1", timeout=20)
        assert status == 200 and b'"worker": "ok"' in body

        # OTLP/gRPC is served too: an export with the key is answered OK.
        with grpc.insecure_channel(f"127.0.0.1:{embedded_env['OTLP_GRPC_PORT']}") as channel:
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                         request_serializer=None, response_deserializer=lambda b: b)
            assert export(b"", metadata=(("authorization", f"Bearer {key}"),), timeout=20) == b""

        assert b"password: " not in (tmp_path / "run.log").read_bytes()  # ADMIN_PASSWORD was given
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("make run did not stop within 30 s of Ctrl-C")
        log.close()
    assert http.get(f"{base}/healthz", timeout=2)[0] is None, "something still listens after Ctrl-C"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(embedded_env["OTLP_GRPC_PORT"]))) != 0, "gRPC still listens"
