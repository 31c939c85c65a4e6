"""The gateway under test as it runs: Daphne serving ``controlplane.asgi`` in a second process on the
test database, and fake OpenAI-compatible upstreams (real HTTP servers) behind it. Tests that use the
server commit their rows (``transaction=True``), so PostgreSQL only: an in-memory SQLite test
database is out of a second process's reach."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.gateway.fake_openai import FakeOpenAI
from tests.http_client import get

ROOT = Path(__file__).resolve().parents[2]

needs_postgres = pytest.mark.skipif(connection.vendor != "postgresql",
                                    reason="the gateway server runs in a second process: PostgreSQL only")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _database_url() -> str:
    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture(scope="module")
def gateway_server(django_db_setup, django_db_blocker, tmp_path_factory):
    """The base URL of a Daphne process serving the whole ASGI application (the gateway mounted beside
    Django), as ``make web`` serves it, on the test database."""
    yield from serve_gateway(tmp_path_factory)


def serve_gateway(tmp_path_factory, **env_extra: str):
    """Run Daphne on the test database (with ``env_extra`` in its environment); yields its base URL."""
    if connection.vendor != "postgresql":
        pytest.skip("the gateway server runs in a second process: PostgreSQL only")
    port = _free_port()
    log = (tmp_path_factory.mktemp("gateway") / "daphne.log").open("w")
    env = {**os.environ, "DATABASE_URL": _database_url(), "GATEWAY_ROUTES_TTL_SECONDS": "0",
           "DATA_DIR": str(tmp_path_factory.mktemp("gateway-data")), **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                             "controlplane.asgi:application"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, _ = get(f"{url}/healthz", timeout=1)
        if status is not None:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"daphne exited: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("daphne did not start")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def upstream():
    with FakeOpenAI(models=("fake-gpt", "gpt-4o", "text-embedding-3-small")) as server:
        yield server


@pytest.fixture
def second_upstream():
    with FakeOpenAI(models=("fake-gpt", "gpt-4o")) as server:
        yield server


@pytest.fixture(autouse=True)
def _gateway_quiet(request):
    """The gateway settles and records a call after answering it: before the test's tables are
    flushed, wait until every call it admitted is settled and recorded (a flush beside its writes
    would deadlock)."""
    yield
    if "gateway_server" not in request.fixturenames:
        return
    from apps.budgets.models import Reservation
    from apps.traces.models import IngestBatch

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        admitted = Reservation.objects.exclude(state="refused")
        if (not admitted.filter(state="held").exists()
                and IngestBatch.objects.filter(source="gateway").count() >= admitted.count()):
            return
        time.sleep(0.05)


def settled(reservation_id: int, timeout: float = 10):
    """The reservation once the gateway has settled or released it (it does after answering)."""
    from apps.budgets.models import Reservation

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = Reservation.objects.get(pk=reservation_id)
        if r.state != "held":
            return r
        time.sleep(0.05)
    raise AssertionError(f"reservation {reservation_id} still held")
