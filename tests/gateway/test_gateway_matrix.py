"""The gateway's endpoints in the permission matrix. They live outside Django's URLconf (a plain ASGI
app beside it), so ``tests/system/test_endpoint_matrix.py`` cannot walk them: this file holds every
route of ``apps.gateway.app.ROUTES`` to what it requires (an agent key with the budget and ingest
scopes; people's sessions are not read there) with real requests to the running server."""
from __future__ import annotations

import httpx
import pytest

from apps.budgets.models import Reservation
from apps.gateway import app, services
from tests.gateway.conftest import needs_postgres

pytestmark = [pytest.mark.django_db(transaction=True), needs_postgres]

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
# (path, method) -> the body it is sent with; each requires a key holding budget + ingest.
GATEWAY_MATRIX = {
    ("/gateway/v1/chat/completions", "POST"): BODY,
    ("/gateway/v1/embeddings", "POST"): {"model": "gpt-4o", "input": "hi"},
    ("/gateway/v1/models", "GET"): None,
}


def test_every_gateway_route_has_an_entry():
    assert set(app.ROUTES) == set(GATEWAY_MATRIX)


@pytest.fixture
def world(gateway_server, project, other_project, make_key, client_for, alice, upstream):
    services.upstream_create(project=project, actor=None, name="primary", base_url=f"{upstream.url}/v1",
                             provider="openai", model_names=["gpt-4o"])
    keys = {"all": make_key(project, scopes=("budget", "ingest", "read"))[1],
            "no-budget": make_key(project, scopes=("ingest", "read"))[1],
            "no-ingest": make_key(project, scopes=("budget", "read"))[1],
            "globex": make_key(other_project, scopes=("budget", "ingest"))[1]}
    return gateway_server, keys, upstream


def call(base, path, method, body, key=None, cookies=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{base}{path}", json=body, headers=headers, cookies=cookies, timeout=10)


@pytest.mark.parametrize(("path", "method"), sorted(GATEWAY_MATRIX))
def test_a_gateway_route_requires_an_agent_key_with_budget_and_ingest(world, path, method, client_for, alice):
    base, keys, upstream = world
    body = GATEWAY_MATRIX[(path, method)]
    r = call(base, path, method, body)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "not_authenticated")
    # A person's session signs nobody in here.
    session = client_for(alice)
    session.get("/api/v1/me")
    r = call(base, path, method, body, cookies={"sessionid": session.cookies["sessionid"].value})
    assert r.status_code == 401
    for scopes in ("no-budget", "no-ingest"):
        r = call(base, path, method, body, keys[scopes])
        assert (r.status_code, r.json()["error"]["code"]) == (403, "missing_scope"), scopes
    r = call(base, path, method, body, keys["globex"])
    if method == "GET":
        assert r.status_code == 200 and r.json()["data"] == []  # its own project's models: none
    else:
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
    assert upstream.snapshot() == [] and not Reservation.objects.exists()
    r = call(base, path, method, body, keys["all"])
    assert r.status_code == 200, r.text
