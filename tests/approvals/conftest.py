"""What the approvals tests share: approvers, an agent key (minted by alice), a request helper."""
from __future__ import annotations

import pytest

from apps.projects import services as project_services
from apps.projects.models import Role
from tests.budgets.conftest import receiver  # noqa: F401 - a real webhook receiver


@pytest.fixture
def dave(django_user_model, project, alice):
    """Approver of `project`."""
    user = django_user_model.objects.create_user("dave", password="pw-dave", email="dave@example.com")
    project_services.role_grant(project=project, user=user, role=Role.APPROVER, actor=alice)
    return user


@pytest.fixture
def erin(django_user_model, project, alice):
    """A second approver of `project`."""
    user = django_user_model.objects.create_user("erin", password="pw-erin", email="erin@example.com")
    project_services.role_grant(project=project, user=user, role=Role.APPROVER, actor=alice)
    return user


@pytest.fixture
def agent_key(project, make_key, alice):
    """A key with the approvals scope, minted by alice (its owner: she can never approve its requests)."""
    return project_services.api_key_create(project=project, name="agent", scopes=["approvals", "ingest", "read"],
                                           actor=alice)


@pytest.fixture
def agent(agent_key, key_client):
    return key_client(agent_key[1])


ARGS = {"to": "customer@example.com", "amount": 120, "currency": "EUR"}


@pytest.fixture
def ask(agent):
    """Request an approval as the agent; returns the answer's JSON (asserting 201 or 200)."""

    def make(action: str = "payments.refund", arguments=None, **fields):
        body = {"action": action, "arguments": ARGS if arguments is None else arguments,
                "summary": "Refund order 1234", **fields}
        headers = {}
        if "idempotency_key" in body:
            headers["HTTP_IDEMPOTENCY_KEY"] = body.pop("idempotency_key")
        resp = agent.post("/api/v1/approvals", body, format="json", **headers)
        assert resp.status_code in (200, 201), resp.content
        return resp.json()

    return make
