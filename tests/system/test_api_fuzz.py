"""Property: no request the served OpenAPI schema describes gets a 5xx. Schemathesis turns the schema
that ``/api/schema/`` serves into Hypothesis strategies for every operation (bodies, path and query
parameters, headers); each case is sent through the real stack as the principal the operation is
for (an agent key for the run log, a project admin for the rest), with the real project's slug or the
generated one, and must be answered with something other than a server error."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis.core import NotSet

pytestmark = pytest.mark.django_db

EXAMPLES_PER_OPERATION = 25


def _served_schema() -> dict:
    return json.loads(APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").content)


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_no_operation_the_schema_describes_answers_5xx(project, alice, make_key):
    schema = schemathesis.openapi.from_dict(_served_schema())
    operations = _operations(schema)
    assert {op.path for op in operations} >= {"/api/v1/runs", "/api/v1/runs/{run_id}/spans",
                                              "/api/v1/runs/{run_id}/spans/{span_id}", "/api/v1/runs/{run_id}/finish",
                                              "/api/v1/projects/{slug}", "/api/v1/projects/{slug}/keys"}
    _, raw = make_key(project, scopes=["ingest", "read"])
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    person = APIClient()
    person.force_login(alice)
    failures: list[str] = []
    answered: Counter = Counter()

    def for_agent(op) -> bool:
        return op.path.startswith(("/api/v1/runs", "/api/v1/sessions"))

    # The agent's operations first: the person's include revoking keys by generated id, which can
    # hit the agent's own key (every later write would then be a 401 and the check below vacuous).
    for op in sorted(operations, key=lambda op: not for_agent(op)):
        _fuzz(op, agent if for_agent(op) else person, project.slug, failures, answered)
    assert not failures, "\n".join(failures[:10])
    # Not vacuous: generated writes got through validation to the inbox, and others were refused.
    assert answered[("POST", "/api/v1/runs", 202)] and answered[("POST", "/api/v1/runs/{run_id}/spans", 400)]


def _fuzz(op, client: APIClient, slug: str, failures: list[str], answered: Counter) -> None:
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(), real_slug=st.booleans())
    def check(case, real_slug):
        if real_slug and "slug" in (case.path_parameters or {}):
            case.path_parameters["slug"] = slug
        headers = {k: v for k, v in (case.headers or {}).items()
                   if k.lower() not in ("authorization", "x-api-key", "content-type", "content-length")}
        kwargs = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()}
        body = case.body
        data = None if body is None or isinstance(body, NotSet) else json.dumps(body)
        response = client.generic(op.method.upper(), case.formatted_path, data=data or "",
                                  content_type="application/json", QUERY_STRING=_query(case.query), **kwargs)
        answered[(op.method.upper(), op.path, response.status_code)] += 1
        if response.status_code >= 500:
            failures.append(f"{op.method.upper()} {case.formatted_path} {case.query} {data!r:.500} -> "
                            f"{response.status_code} {response.content[:300]!r}")

    check()


def _query(query) -> str:
    from urllib.parse import urlencode

    return urlencode(query or {}, doseq=True)
