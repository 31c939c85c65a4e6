"""What the evals tests share: an agent key, runs recorded the way the REST API records them, and
people with the roles that score."""
from __future__ import annotations

import pytest

from apps.projects import services as project_services
from apps.projects.models import Role
from apps.traces.models import Run
from tests.traces.helpers import accept, drain, finish, span, start


@pytest.fixture
def agent_key(project, make_key):
    """(ApiKey, raw): ingest + read, as an agent (or an external evaluator) holds."""
    return make_key(project, scopes=("ingest", "read"), name="agent")


@pytest.fixture
def dave(django_user_model, project, alice):
    """Approver of `project` (approvers, operators and admins give feedback)."""
    user = django_user_model.objects.create_user("dave", password="pw-dave")
    project_services.role_grant(project=project, user=user, role=Role.APPROVER, actor=alice)
    return user


@pytest.fixture
def record(project, agent_key):
    """Record a finished run (start, spans, finish) through the inbox and the projection; the Run."""

    def make(run_id: str, *, spans=(), status="completed", output="All done.", agent="support-bot", version="1",
             metadata=None, key=None, proj=None, finish_run=True, **finish_kw):
        recs = [start(run_id, agent={"name": agent, "version": version}, metadata=metadata or {}),
                *(span(run_id, **s) for s in spans)]
        if finish_run:
            recs.append(finish(run_id, status=status, output=output, **finish_kw))
        accept(proj or project, key or agent_key[0], recs)
        drain()
        return Run.objects.get(project=proj or project, run_id=run_id)

    return make
