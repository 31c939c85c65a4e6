"""With the database unreachable, the write (and read) endpoints answer 503 + Retry-After, never a 500
and never a 2xx for data that was not stored; when it comes back, the same server accepts again.

A real server process talks to PostgreSQL through a TCP proxy that the test cuts, as a network
partition or a stopped database would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from django.conf import settings
from django.db import connection
from google.rpc import error_details_pb2, status_pb2

from apps.traces.models import IngestBatch
from tests import http_client as http

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not (os.environ.get("DATABASE_URL", "").startswith("postgres") and settings.REDIS_URL),
                       reason="needs PostgreSQL and Redis (a separate server process)"),
]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and stops listening."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = _free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key(project, make_key):
    return make_key(project)[1]


def test_writes_answer_503_with_retry_after_while_the_database_is_unreachable(key, tmp_path):
    s = connection.settings_dict
    proxy = TcpProxy((s["HOST"] or "127.0.0.1", int(s["PORT"] or 5432)))
    proxy.start()
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": f"postgres://{s['USER']}@127.0.0.1:{proxy.port}/{s['NAME']}",
           "DATA_DIR": str(tmp_path / "var"), "DATABASE_POOL_TIMEOUT": "2"}
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "manage.py", "serve", "--no-worker", "--port", str(port)], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    grpc_port = _free_port()
    grpc_log = open(tmp_path / "grpc.log", "wb")
    grpc_server = subprocess.Popen([sys.executable, "manage.py", "otlp_grpc", "--port", str(grpc_port)], cwd=ROOT,
                                   env=env, stdout=grpc_log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def write(run_id: str):
        return http.request("POST", f"{base}/api/v1/runs", headers=headers, timeout=20,
                            data=json.dumps({"run_id": run_id}).encode())

    try:
        deadline = time.monotonic() + 60
        while http.get(f"{base}/healthz")[0] != 200:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)
        status, body, _ = write("before")
        assert status == 202, body

        proxy.cut()
        for attempt in ("during-1", "during-2"):
            status, body, hdrs = write(attempt)
            assert status == 503, body
            assert json.loads(body)["error_code"] == "service_unavailable" and int(hdrs["Retry-After"]) > 0
        for path in ("/api/v1/runs", "/api/v1/runs/before", "/healthz"):
            status, body, hdrs = http.request("GET", f"{base}{path}", headers=headers, timeout=20)
            assert status == 503 and hdrs.get("Retry-After"), (path, status, body)
        # Outside the API too (the admin loads the session from the database): 503, not 500.
        status, body, hdrs = http.request("GET", f"{base}/admin/", headers={"Cookie": "sessionid=" + "a" * 32}, timeout=20)
        assert status == 503 and hdrs.get("Retry-After"), (status, body[:200])
        status, body, hdrs = http.request("POST", f"{base}/api/v1/runs/before/spans", headers=headers, timeout=20,
                                          data=b'[{"span_id": "s1"}]')
        assert status == 503 and hdrs.get("Retry-After"), body

        # The OTLP receiver too: exporters retry on 503 (they drop data on a 500).
        status, body, hdrs = http.request("POST", f"{base}/v1/traces", timeout=20, data=b"\x0a\x00",
                                          headers={"Authorization": f"Bearer {key}",
                                                   "Content-Type": "application/x-protobuf"})
        assert status == 503 and int(hdrs["Retry-After"]) > 0, (status, body)
        assert status_pb2.Status.FromString(body).code == 14  # UNAVAILABLE

        # And the OTLP/gRPC receiver (`manage.py otlp_grpc`): UNAVAILABLE with a RetryInfo.
        code, status_detail = _grpc_export(grpc_port, key)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, (tmp_path / "grpc.log").read_text()[-2000:])
        info = error_details_pb2.RetryInfo()
        assert status_detail.details[0].Unpack(info) and info.retry_delay.seconds > 0

        proxy.start()  # the database is back: the same server process recovers on its own
        deadline = time.monotonic() + 30
        while (status := write("after")[0]) != 202:
            assert status == 503 and time.monotonic() < deadline, status
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while (code := _grpc_export(grpc_port, key)[0]) != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, code
            time.sleep(0.5)
    finally:
        grpc_server.terminate()
        try:
            assert grpc_server.wait(timeout=20) == 0, (tmp_path / "grpc.log").read_text()[-2000:]
        except subprocess.TimeoutExpired:
            grpc_server.kill()
        grpc_log.close()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        proxy.cut()
        log.close()
    # Exactly what was acknowledged is stored: nothing of the refused writes.
    assert sorted(b.payload[0]["run_id"] for b in IngestBatch.objects.filter(kind="records")) == ["after", "before"]
    assert IngestBatch.objects.filter(kind="otlp.traces", source="otlp-grpc").count() == 1


def _grpc_export(port: int, key: str):
    """Export one span over OTLP/gRPC: (status code, google.rpc.Status from the trailers or None)."""
    from tests.ingest import builders as b

    body = b.request(b.span(b.trace_id(77), b.span_id(77), name="over-grpc")).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                   request_serializer=None, response_deserializer=lambda b: b)
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            call(body, metadata=(("authorization", f"Bearer {key}"),), timeout=20)
            return grpc.StatusCode.OK, None
        except grpc.RpcError as exc:
            detail = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
            return exc.code(), status_pb2.Status.FromString(detail) if detail else None
