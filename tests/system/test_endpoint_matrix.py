"""The endpoint matrix: every endpoint and every admin says who may use it, and is held to it.

``MATRIX`` has one entry per endpoint (URL pattern + HTTP method its view implements) of the whole
URLconf but the admin; ``ADMIN_MATRIX`` one per registered ModelAdmin. A new view or admin without
an entry fails ``test_every_endpoint_has_an_entry`` / ``test_every_admin_has_an_entry``: say what it
requires, and the checks below run real requests against it (anonymous, an outsider, an auditor,
another project's key, a key without the scope, ...). The rules themselves live in
``apps.projects.access`` (one authorization path); this file is the one place that checks them all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from rest_framework.test import APIClient

from apps.approvals import services as approval_services
from apps.approvals.models import Approval
from apps.audit.models import AuditEvent
from apps.budgets import services as budget_services
from apps.budgets.models import CostSettings, CostSpike, PriceOverride, Reservation
from apps.evals import jobs as eval_jobs_services
from apps.evals import services as eval_services
from apps.evals.models import EvalPending
from apps.gateway import services as gateway_services
from apps.projects.admin import ScopedAdminMixin
from apps.scheduler import services as scheduler_services
from apps.scheduler.models import Control, LoadedModel, QueueTask
from apps.traces.models import DeadRecord, IngestBatch, Run
from tests.ingest import builders as otlp_builders
from tests.streaming import read_streamed
from tests.traces.helpers import at, drain

pytestmark = pytest.mark.django_db

ALL_SCOPES = ("ingest", "read", "budget", "approvals", "queue")
PROTOBUF = "application/x-protobuf"

# --- what an endpoint requires ---------------------------------------------------------------------

PUBLIC = "public"                # anyone, no credentials
AUTHENTICATED = "authenticated"  # any person or key, whatever their projects and scopes
READ = "read"                    # one project's object: keys need `scope` (their own project only), people a role
LIST = "list"                    # rows of every visible project: keys need `scope`; others' rows never listed
PERSON_READ = "person read"      # one project's object, people with a role only (keys: 403 person_only)
PERSON_WRITE = "person write"    # people holding project permission `perm` (keys: person_only; others: 403/404)
PERSON_CREATE = "person create"  # people holding model permission `perm` (keys need `scope`, then person_only)
KEY_WRITE = "key write"          # API keys with `scope`; the key decides the project (people: `person`)
KEY_QUERY = "key query"          # API keys with `scope` ask about their own project, changing nothing (people:
                                 # `person`)
KEY_ACTION = "key action"        # API keys with `scope` on their own project's object (others' keys: 404; people:
                                 # `person`)
# The product's pages (session sign-in; an API key is not a person there: sent to the login page).
PAGE_PUBLIC = "page public"      # anyone (the login page)
PAGE_LIST = "page list"          # rows of every project the person holds a role in; others' rows never shown
PAGE_READ = "page read"          # one project's object: people with a role there; anyone else 404
PAGE_ACTION = "page action"      # a form any person with a role may send (changing nothing); others 403


@dataclass(frozen=True)
class Endpoint:
    requires: str
    path: str                     # the request path; {slug}, {key_id}, {run_id}, {span_id}, {session_id}: acme's
    scope: str | None = None
    perm: str | None = None
    body: Any = None              # JSON; bytes are sent as OTLP protobuf
    person: tuple[int, str] = (403, "api_key_required")  # KEY_WRITE: what a person is answered
    marker: str = "acme"          # LIST: a string only acme's rows show
    rows: Any = None              # KEY_WRITE: counts what a write adds to a project (default: ingest batches)


def _otlp_traces() -> bytes:
    return otlp_builders.request(otlp_builders.span(otlp_builders.trace_id(), name="matrix")).SerializeToString()


def _otlp_logs() -> bytes:
    return otlp_builders.logs_request({"event_name": "matrix", "body": "hello", "trace_id": otlp_builders.trace_id(),
                                       "span_id": otlp_builders.span_id()}).SerializeToString()


RUN = "api/v1/runs/<str:run_id>"
PROJECT = "api/v1/projects/<slug:slug>"
RUN_PAGE = "runs/<slug:project>/<str:run_id>"

# (METHOD, URL pattern) -> what it requires. "*": a function view answering every method alike.
MATRIX: dict[tuple[str, str], Endpoint] = {
    ("*", "healthz"): Endpoint(PUBLIC, "healthz"),
    ("GET", "api/schema/"): Endpoint(PUBLIC, "api/schema/"),
    ("GET", "api/docs/"): Endpoint(PUBLIC, "api/docs/"),
    ("GET", "api/v1/me"): Endpoint(AUTHENTICATED, "api/v1/me"),
    # projects, members, keys
    ("GET", "api/v1/projects"): Endpoint(LIST, "api/v1/projects", scope="read", marker='"acme"'),
    ("POST", "api/v1/projects"): Endpoint(PERSON_CREATE, "api/v1/projects", scope="read", perm="projects.add_project",
                                          body={"slug": "initech", "name": "Initech"}),
    ("GET", PROJECT): Endpoint(READ, "api/v1/projects/{slug}", scope="read"),
    ("PATCH", PROJECT): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}", perm="change_project",
                                 body={"name": "Acme renamed"}),
    ("GET", f"{PROJECT}/members"): Endpoint(PERSON_READ, "api/v1/projects/{slug}/members"),
    ("POST", f"{PROJECT}/members"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/members", perm="manage_project",
                                             body={"username": "charlie", "role": "approver"}),
    ("DELETE", f"{PROJECT}/members/<str:username>/<str:role>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/members/bob/auditor", perm="manage_project"),
    ("GET", f"{PROJECT}/keys"): Endpoint(PERSON_READ, "api/v1/projects/{slug}/keys"),
    ("POST", f"{PROJECT}/keys"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/keys", perm="manage_project",
                                          body={"name": "new", "scopes": ["read"]}),
    ("POST", f"{PROJECT}/keys/<int:key_id>/revoke"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/keys/{key_id}/revoke", perm="manage_project"),
    ("POST", f"{PROJECT}/webhook-secret"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/webhook-secret",
                                                    perm="manage_project"),
    # the run log
    ("GET", "api/v1/runs"): Endpoint(LIST, "api/v1/runs", scope="read", marker="{run_id}"),
    ("POST", "api/v1/runs"): Endpoint(KEY_WRITE, "api/v1/runs", scope="ingest",
                                      body={"run_id": "written", "started_at": at(0)}),
    ("GET", RUN): Endpoint(READ, "api/v1/runs/{run_id}", scope="read"),
    ("POST", f"{RUN}/spans"): Endpoint(KEY_WRITE, "api/v1/runs/{run_id}/spans", scope="ingest",
                                       body={"span_id": "written", "kind": "llm", "start_time": at(1)}),
    ("PATCH", f"{RUN}/spans/<str:span_id>"): Endpoint(KEY_WRITE, "api/v1/runs/{run_id}/spans/{span_id}",
                                                      scope="ingest", body={"status": "ok", "end_time": at(2)}),
    ("POST", f"{RUN}/finish"): Endpoint(KEY_WRITE, "api/v1/runs/{run_id}/finish", scope="ingest",
                                        body={"status": "completed"}),
    ("GET", "api/v1/sessions/<str:session_id>/runs"): Endpoint(LIST, "api/v1/sessions/{session_id}/runs",
                                                               scope="read", marker="{run_id}"),
    ("GET", "api/v1/agents"): Endpoint(LIST, "api/v1/agents", scope="read", marker='"acme"'),
    ("GET", "api/v1/sessions/<str:session_id>"): Endpoint(READ, "api/v1/sessions/{session_id}", scope="read"),
    ("GET", "api/v1/sessions/<str:session_id>/tool-calls"): Endpoint(LIST, "api/v1/sessions/{session_id}/tool-calls",
                                                                     scope="read", marker="acme-lookup"),
    # costs
    ("GET", "api/v1/costs"): Endpoint(LIST, "api/v1/costs?group_by=project,model", scope="read", marker='"acme"'),
    ("GET", "api/v1/costs/unpriced"): Endpoint(LIST, "api/v1/costs/unpriced", scope="read", marker="acme-model"),
    ("GET", "api/v1/costs/spikes"): Endpoint(LIST, "api/v1/costs/spikes", scope="read", marker='"acme"'),
    ("GET", f"{RUN}/costs"): Endpoint(READ, "api/v1/runs/{run_id}/costs", scope="read"),
    ("GET", f"{PROJECT}/price-overrides"): Endpoint(READ, "api/v1/projects/{slug}/price-overrides", scope="read"),
    ("POST", f"{PROJECT}/price-overrides"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/price-overrides", perm="change_project",
        body={"model_pattern": "new-model-*", "effective_from": "2026-01-01", "input_per_mtok": "1",
              "output_per_mtok": "2"}),
    ("PATCH", f"{PROJECT}/price-overrides/<int:override_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/price-overrides/{override_id}", perm="change_project",
        body={"note": "contract rate"}),
    ("DELETE", f"{PROJECT}/price-overrides/<int:override_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/price-overrides/{override_id}", perm="change_project"),
    ("GET", f"{PROJECT}/cost-settings"): Endpoint(READ, "api/v1/projects/{slug}/cost-settings", scope="read"),
    ("PATCH", f"{PROJECT}/cost-settings"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/cost-settings",
                                                    perm="change_project", body={"spike_factor": "4"}),
    # budgets (caps) and the call boundary's reservations
    ("GET", f"{PROJECT}/budgets"): Endpoint(READ, "api/v1/projects/{slug}/budgets", scope="read"),
    ("POST", f"{PROJECT}/budgets"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/budgets", perm="change_project",
                                             body={"name": "new", "cap_usd": "5"}),
    ("GET", f"{PROJECT}/budgets/<int:budget_id>"): Endpoint(READ, "api/v1/projects/{slug}/budgets/{budget_id}",
                                                            scope="read"),
    ("PATCH", f"{PROJECT}/budgets/<int:budget_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/budgets/{budget_id}", perm="change_project", body={"cap_usd": "7"}),
    ("DELETE", f"{PROJECT}/budgets/<int:budget_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/budgets/{budget_id}", perm="change_project"),
    ("POST", "api/v1/budget/reservations"): Endpoint(KEY_WRITE, "api/v1/budget/reservations", scope="budget",
                                                     body={"estimated_cost_usd": "0.01"},
                                                     rows=lambda p: Reservation.objects.filter(project=p).count()),
    ("GET", "api/v1/budget/reservations/<int:reservation_id>"): Endpoint(
        READ, "api/v1/budget/reservations/{reservation_id}", scope="budget"),
    ("POST", "api/v1/budget/reservations/<int:reservation_id>/settle"): Endpoint(
        KEY_ACTION, "api/v1/budget/reservations/{reservation_id}/settle", scope="budget", body={"cost_usd": "0.01"}),
    ("POST", "api/v1/budget/reservations/<int:reservation_id>/release"): Endpoint(
        KEY_ACTION, "api/v1/budget/reservations/{reservation_id}/release", scope="budget"),
    # the GPU queue: tasks submitted and read by agent keys (queue scope); operators steer (people holding
    # operate_project, never a key)
    ("GET", "api/v1/queue/tasks"): Endpoint(LIST, "api/v1/queue/tasks", scope="queue", marker="{task_id}"),
    ("POST", "api/v1/queue/tasks"): Endpoint(KEY_WRITE, "api/v1/queue/tasks", scope="queue",
                                             body={"kind": "chat", "model": "llama", "input": {"messages": []}},
                                             rows=lambda p: QueueTask.objects.filter(project=p).count()),
    ("GET", "api/v1/queue/tasks/<str:task_id>"): Endpoint(READ, "api/v1/queue/tasks/{task_id}", scope="queue"),
    ("POST", "api/v1/queue/tasks/<str:task_id>/cancel"): Endpoint(
        PERSON_WRITE, "api/v1/queue/tasks/{task_id}/cancel", perm="operate_project", body={"reason": "matrix"}),
    ("POST", "api/v1/queue/tasks/<str:task_id>/redirect"): Endpoint(
        PERSON_WRITE, "api/v1/queue/tasks/{task_id}/redirect", perm="operate_project", body={"backend": "vllm-2"}),
    ("POST", "api/v1/queue/tasks/<str:task_id>/priority"): Endpoint(
        PERSON_WRITE, "api/v1/queue/tasks/{task_id}/priority", perm="operate_project", body={"priority": 5}),
    ("GET", f"{PROJECT}/queue"): Endpoint(READ, "api/v1/projects/{slug}/queue", scope="read"),
    ("POST", f"{PROJECT}/queue/controls"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/queue/controls", perm="operate_project",
        body={"device": "gpu0", "paused": True, "reason": "matrix"}),
    # approvals: rules by project admins; requests, consumes and cancels by agent keys; decisions by people
    ("GET", f"{PROJECT}/approval-rules"): Endpoint(READ, "api/v1/projects/{slug}/approval-rules", scope="read"),
    ("POST", f"{PROJECT}/approval-rules"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/approval-rules",
                                                    perm="change_project", body={"name": "new", "quorum": 2}),
    ("GET", f"{PROJECT}/approval-rules/<int:rule_id>"): Endpoint(
        READ, "api/v1/projects/{slug}/approval-rules/{rule_id}", scope="read"),
    ("PATCH", f"{PROJECT}/approval-rules/<int:rule_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/approval-rules/{rule_id}", perm="change_project", body={"quorum": 3}),
    ("DELETE", f"{PROJECT}/approval-rules/<int:rule_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/approval-rules/{rule_id}", perm="change_project"),
    ("POST", "api/v1/approvals/check"): Endpoint(KEY_QUERY, "api/v1/approvals/check", scope="approvals",
                                                 body={"action": "payments.refund"}),
    ("GET", "api/v1/approvals"): Endpoint(LIST, "api/v1/approvals", scope="approvals", marker="{approval_id}"),
    ("POST", "api/v1/approvals"): Endpoint(KEY_WRITE, "api/v1/approvals", scope="approvals",
                                           body={"action": "send_email", "arguments": {"to": "someone"}},
                                           rows=lambda p: Approval.objects.filter(project=p).count()),
    ("GET", "api/v1/approvals/<str:approval_id>"): Endpoint(READ, "api/v1/approvals/{approval_id}",
                                                            scope="approvals"),
    ("POST", "api/v1/approvals/<str:approval_id>/approve"): Endpoint(
        PERSON_WRITE, "api/v1/approvals/{approval_id}/approve", perm="approve_project", body={"reason": "fine"}),
    ("POST", "api/v1/approvals/<str:approval_id>/reject"): Endpoint(
        PERSON_WRITE, "api/v1/approvals/{approval_id}/reject", perm="approve_project", body={"reason": "no"}),
    ("POST", "api/v1/approvals/<str:approval_id>/consume"): Endpoint(
        KEY_ACTION, "api/v1/approvals/{approved_id}/consume", scope="approvals",
        body={"action": "matrix.action", "arguments": {"n": 1}}),
    ("POST", "api/v1/approvals/<str:approval_id>/cancel"): Endpoint(
        KEY_ACTION, "api/v1/approvals/{approval_id}/cancel", scope="approvals"),
    # evals: a run's scores (read), external scores (keys), people's feedback, after-run configurations
    ("GET", f"{RUN}/scores"): Endpoint(READ, "api/v1/runs/{run_id}/scores", scope="read"),
    ("POST", f"{RUN}/scores"): Endpoint(KEY_ACTION, "api/v1/runs/{run_id}/scores", scope="ingest",
                                        body={"evaluator": "matrix", "score": 1}),
    ("POST", f"{RUN}/feedback"): Endpoint(PERSON_WRITE, "api/v1/runs/{run_id}/feedback", perm="score_project",
                                          body={"passed": True}),
    ("GET", "api/v1/evaluators"): Endpoint(AUTHENTICATED, "api/v1/evaluators"),
    ("GET", f"{PROJECT}/eval-configs"): Endpoint(READ, "api/v1/projects/{slug}/eval-configs", scope="read"),
    ("POST", f"{PROJECT}/eval-configs"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/eval-configs",
                                                  perm="change_project",
                                                  body={"name": "new", "evaluators": [{"name": "run_succeeded"}]}),
    ("GET", f"{PROJECT}/eval-configs/<int:config_id>"): Endpoint(
        READ, "api/v1/projects/{slug}/eval-configs/{config_id}", scope="read"),
    ("PATCH", f"{PROJECT}/eval-configs/<int:config_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/eval-configs/{config_id}", perm="change_project",
        body={"sample_rate": 0.5}),
    ("DELETE", f"{PROJECT}/eval-configs/<int:config_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/eval-configs/{config_id}", perm="change_project"),
    ("GET", f"{PROJECT}/eval-regressions"): Endpoint(READ, "api/v1/projects/{slug}/eval-regressions", scope="read"),
    # evals: batch jobs over history (project admins edit and start them; the batches' progress is read)
    ("GET", f"{PROJECT}/eval-jobs"): Endpoint(READ, "api/v1/projects/{slug}/eval-jobs", scope="read"),
    ("POST", f"{PROJECT}/eval-jobs"): Endpoint(PERSON_WRITE, "api/v1/projects/{slug}/eval-jobs", perm="change_project",
                                               body={"name": "new", "evaluators": [{"name": "run_succeeded"}],
                                                     "schedule": "0 3 * * *"}),
    ("GET", f"{PROJECT}/eval-jobs/<int:job_id>"): Endpoint(READ, "api/v1/projects/{slug}/eval-jobs/{job_id}",
                                                           scope="read"),
    ("PATCH", f"{PROJECT}/eval-jobs/<int:job_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/eval-jobs/{job_id}", perm="change_project", body={"window_hours": 48}),
    ("DELETE", f"{PROJECT}/eval-jobs/<int:job_id>"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/eval-jobs/{job_id}", perm="change_project"),
    ("GET", f"{PROJECT}/eval-jobs/<int:job_id>/runs"): Endpoint(
        READ, "api/v1/projects/{slug}/eval-jobs/{busy_job_id}/runs", scope="read"),
    ("POST", f"{PROJECT}/eval-jobs/<int:job_id>/runs"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/eval-jobs/{job_id}/runs", perm="change_project", body={}),
    ("GET", f"{PROJECT}/eval-jobs/<int:job_id>/runs/<int:batch_id>"): Endpoint(
        READ, "api/v1/projects/{slug}/eval-jobs/{busy_job_id}/runs/{batch_id}", scope="read"),
    ("POST", f"{PROJECT}/eval-jobs/<int:job_id>/runs/<int:batch_id>/cancel"): Endpoint(
        PERSON_WRITE, "api/v1/projects/{slug}/eval-jobs/{busy_job_id}/runs/{batch_id}/cancel", perm="change_project"),
    # OTLP/HTTP: keys only (a person's session is not read there: 401)
    ("POST", "v1/traces"): Endpoint(KEY_WRITE, "v1/traces", scope="ingest", body=_otlp_traces(),
                                    person=(401, "not_authenticated")),
    ("POST", "v1/logs"): Endpoint(KEY_WRITE, "v1/logs", scope="ingest", body=_otlp_logs(),
                                  person=(401, "not_authenticated")),
    # the product's pages
    ("GET", "login/"): Endpoint(PAGE_PUBLIC, "login/"),
    ("POST", "login/"): Endpoint(PAGE_PUBLIC, "login/"),
    ("POST", "logout/"): Endpoint(PAGE_PUBLIC, "logout/"),
    ("GET", ""): Endpoint(PAGE_LIST, "", marker="{run_id}"),
    ("GET", "runs/"): Endpoint(PAGE_LIST, "runs/", marker="{run_id}"),
    ("GET", "runs/export.<str:fmt>"): Endpoint(PAGE_LIST, "runs/export.csv", marker="{run_id}"),
    ("GET", f"{RUN_PAGE}/"): Endpoint(PAGE_READ, "runs/acme/{run_id}/"),
    ("GET", f"{RUN_PAGE}/export.json"): Endpoint(PAGE_READ, "runs/acme/{run_id}/export.json"),
    ("GET", f"{RUN_PAGE}/spans/<str:span_id>/"): Endpoint(PAGE_READ, "runs/acme/{run_id}/spans/{tool_span_id}/"),
    ("GET", f"{RUN_PAGE}/spans/<str:span_id>/<str:field>.json"): Endpoint(
        PAGE_READ, "runs/acme/{run_id}/spans/{tool_span_id}/tool.json"),
    ("GET", "agents/"): Endpoint(PAGE_LIST, "agents/", marker="project=acme"),
    ("GET", "costs/"): Endpoint(PAGE_LIST, "costs/", marker="acme-model"),
    ("GET", "evals/"): Endpoint(PAGE_LIST, "evals/", marker="acme-busy"),
    ("GET", "queue/"): Endpoint(PAGE_LIST, "queue/", marker='data-queue-project="acme"'),
    ("GET", "sessions/<slug:project>/<path:session_id>/"): Endpoint(PAGE_READ, "sessions/acme/{session_id}/"),
    ("GET", "approvals/"): Endpoint(PAGE_LIST, "approvals/", marker="{approval_id}"),
    ("GET", "approvals/<slug:project>/<str:approval_id>/"): Endpoint(PAGE_READ, "approvals/acme/{approval_id}/"),
    ("GET", "audit/"): Endpoint(PAGE_LIST, "audit/", marker="acme-all"),
    ("POST", "audit/"): Endpoint(PAGE_ACTION, "audit/"),
    ("GET", "audit/export.<str:fmt>"): Endpoint(PAGE_LIST, "audit/export.csv", marker="acme-all"),
}


# --- walking the URLconf -----------------------------------------------------------------------------

PROBED = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _patterns(patterns, prefix: str = ""):
    for p in patterns:
        if isinstance(p, URLResolver):
            if p.app_name == "admin":
                continue  # the admin: ADMIN_MATRIX
            yield from _patterns(p.url_patterns, prefix + str(p.pattern))
        elif isinstance(p, URLPattern):
            yield prefix + str(p.pattern), p.callback


def _view_class(callback):
    return getattr(callback, "cls", None) or getattr(callback, "view_class", None)


def _class_methods(cls) -> set[str]:
    return {m.upper() for m in cls.http_method_names if m not in ("head", "options") and hasattr(cls, m)}


def _function_view_methods(route: str) -> set[str]:
    """A function view's methods, found by asking: any answer but 405 means it implements the method."""
    path = "/" + route
    if "<" in path:
        raise AssertionError(f"{route}: a function view with path parameters; give it a view class")
    answers = {m: Client().generic(m, path).status_code for m in PROBED}
    implemented = {m for m, status in answers.items() if status != 405}
    return {"*"} if implemented == set(PROBED) else implemented


def endpoints() -> set[tuple[str, str]]:
    found = set()
    for route, callback in _patterns(get_resolver().url_patterns):
        cls = _view_class(callback)
        methods = _class_methods(cls) if cls is not None else _function_view_methods(route)
        found |= {(m, route) for m in methods}
    return found


def test_every_endpoint_has_an_entry():
    found = endpoints()
    missing = sorted(found - MATRIX.keys())
    stale = sorted(MATRIX.keys() - found)
    assert not missing, ("endpoints without an entry in MATRIX (say what each requires): "
                         + ", ".join(f"{m} /{r}" for m, r in missing))
    assert not stale, "MATRIX entries for endpoints that no longer exist: " + ", ".join(f"{m} /{r}" for m, r in stale)


# --- the people, keys and rows the checks use ------------------------------------------------------


@pytest.fixture
def world(project, other_project, alice, bob, charlie, make_key, key_client, client_for, django_user_model):
    """acme (alice admin, bob auditor) and globex, each with a run, a span and a session; charlie is an
    outsider; keys are minted per check."""
    acme_key, acme_raw = make_key(project, scopes=ALL_SCOPES, name="acme-all")
    _, globex_raw = make_key(other_project, scopes=ALL_SCOPES, name="globex-all")
    # The runs are recent, so that the pages and APIs with a time window (overview, agents) list them.
    def recent(seconds: float) -> str:
        return (timezone.now() - timedelta(hours=1, seconds=-seconds)).isoformat()

    for raw, name in ((acme_raw, "acme"), (globex_raw, "globex")):
        agent = key_client(raw)
        run = f"{name}-run-1"
        assert agent.post("/api/v1/runs", {"run_id": run, "session_id": f"{name}-session", "started_at": recent(0)},
                          format="json").status_code == 202
        assert agent.post(f"/api/v1/runs/{run}/spans", [
            {"span_id": f"{name}-span-1", "kind": "llm", "start_time": recent(1), "end_time": recent(2),
             "provider": "openai", "model": f"{name}-model", "usage": {"input_tokens": 10}},  # unpriced: a cost row
            {"span_id": f"{name}-tool-1", "kind": "tool", "tool": {"name": f"{name}-lookup"}, "start_time": recent(2),
             "end_time": recent(3), "status": "ok"}], format="json").status_code == 202
    drain()
    overrides = {}
    for p in (project, other_project):  # after the spans: they stay unpriced
        overrides[p.slug] = PriceOverride.objects.create(project=p, model_pattern="other-*",
                                                         effective_from=date(2026, 1, 1), input_per_mtok=1,
                                                         output_per_mtok=2)
        CostSpike.objects.create(project=p, period="hour", day=date(2026, 11, 22), hour=14, scope="project",
                                 value="", spend_nanos=10**10, baseline_nanos=10**9, factor=3)
        CostSettings.objects.create(project=p)
    budgets = {p.slug: budget_services.budget_create(project=p, actor=None, name="daily", cap_nanos=10**9,
                                                     thresholds=[1]) for p in (project, other_project)}
    for p in (project, other_project):  # a settled call crossing 1 %: a ledger row, a reservation, an alert each
        done = budget_services.reservation_create(project_id=p.pk, api_key_id=0, estimated_nanos=10**7).reservation
        budget_services.reservation_settle(reservation=done, cost_nanos=10**7)
    for p in (project, other_project):
        gateway_services.upstream_create(project=p, actor=None, name=f"{p.slug}-upstream",
                                         base_url="http://127.0.0.1:9/v1", model_names=["gpt-4o"])
    held = budget_services.reservation_create(project_id=project.pk, api_key_id=acme_key.pk,
                                              estimated_nanos=10**7).reservation
    rules, pending, approved = {}, {}, {}
    for p in (project, other_project):  # a rule, a pending and an approved approval each
        rules[p.slug] = approval_services.rule_create(project=p, actor=None, name=f"{p.slug}-rule",
                                                      action_pattern="payments.*")
        key_row = type(acme_key).objects.get(project=p, name=f"{p.slug}-all")
        pending[p.slug] = approval_services.approval_request(key=key_row, action="payments.refund",
                                                             arguments={"order": 1}).approval
        approved[p.slug] = approval_services.approval_request(key=key_row, action="matrix.action",
                                                              arguments={"n": 1}).approval
        approval_services.decide(approval=approved[p.slug], user=django_user_model.objects.create_superuser(
            f"{p.slug}-approver", password="pw"), outcome="approve")

    eval_configs = {}
    for p in (project, other_project):  # an after-run configuration, a score and a pending evaluation each
        eval_configs[p.slug] = eval_services.config_create(project=p, actor=None, name=f"{p.slug}-quality",
                                                           evaluators=[{"name": "run_succeeded"}])
        run_row = Run.objects.get(project=p, run_id=f"{p.slug}-run-1")
        eval_services.score_submit(key=type(acme_key).objects.get(project=p, name=f"{p.slug}-all"), run=run_row,
                                   evaluator="matrix.seed", version="1", score=1.0)
        EvalPending.objects.create(project=p, run=run_row, config=eval_configs[p.slug], due_at=timezone.now())
    eval_jobs, busy_jobs, batches = {}, {}, {}
    for p in (project, other_project):  # an idle eval job, and one with a batch running
        eval_jobs[p.slug] = eval_jobs_services.job_create(project=p, actor=None, name=f"{p.slug}-nightly",
                                                          evaluators=[{"name": "run_succeeded"}])
        busy_jobs[p.slug] = eval_jobs_services.job_create(project=p, actor=None, name=f"{p.slug}-busy",
                                                          evaluators=[{"name": "run_succeeded"}])
        batches[p.slug] = eval_jobs_services.job_start(job=busy_jobs[p.slug], trigger="schedule")
    queued_tasks, devices, backends = {}, {}, {}
    for p in (project, other_project):  # a device, a backend, a paused queue, a loaded model, a queued task each
        devices[p.slug] = scheduler_services.device_create(project=p, actor=None, name="gpu0",
                                                           gpu=f"declared:{p.slug}-gpu0", memory_mb=16_384)
        backends[p.slug] = scheduler_services.backend_create(
            project=p, actor=None, name="vllm", device=devices[p.slug], url="http://127.0.0.1:9/v1",
            model_memory={"llama": {"load_mb": 8000, "request_mb": 500}})
        scheduler_services.backend_create(project=p, actor=None, name="vllm-2", device=devices[p.slug],
                                          url="http://127.0.0.1:9/v1",
                                          model_memory={"llama": {"load_mb": 0, "request_mb": 500}})
        LoadedModel.objects.create(project=p, device=devices[p.slug], backend=backends[p.slug], model="llama",
                                   memory_mb=8000, state="loaded", last_used_at=timezone.now(),
                                   changed_at=timezone.now())
        Control.objects.create(project=p, paused=True, reason="matrix", updated_at=timezone.now())
        queued_tasks[p.slug] = scheduler_services.submit(project=p, kind="chat", model="llama",
                                                         task_input={"messages": []}).task

    def key(scopes, proj=None) -> APIClient:
        return key_client(make_key(proj or project, scopes=list(scopes), name="probe")[1])

    return SimpleNamespace(
        acme=project, globex=other_project, alice=alice, bob=bob, charlie=charlie, key=key,
        person=client_for, anonymous=APIClient(),
        root=django_user_model.objects.create_superuser("root", password="pw-root"),
        values={"slug": "acme", "key_id": acme_key.pk, "run_id": "acme-run-1", "span_id": "acme-span-1",
                "tool_span_id": "acme-tool-1", "session_id": "acme-session",
                "override_id": overrides["acme"].pk, "budget_id": budgets["acme"].pk,
                "reservation_id": held.pk, "rule_id": rules["acme"].pk,
                "approval_id": pending["acme"].public_id, "approved_id": approved["acme"].public_id,
                "config_id": eval_configs["acme"].pk, "job_id": eval_jobs["acme"].pk,
                "busy_job_id": busy_jobs["acme"].pk, "batch_id": batches["acme"].pk,
                "task_id": queued_tasks["acme"].public_id})


def _call(client, method: str, e: Endpoint, world):
    path = "/" + e.path.format(**world.values)
    method = "GET" if method == "*" else method
    if isinstance(e.body, bytes):
        return client.generic(method, path, e.body, content_type=PROTOBUF)
    if e.body is None:
        return client.generic(method, path)
    return client.generic(method, path, json.dumps(e.body), content_type="application/json")


def _code(resp) -> str | None:
    if resp.get("X-Error-Code"):
        return resp["X-Error-Code"]
    try:
        return resp.json().get("error_code")
    except (ValueError, AttributeError):
        return None


def _refused(resp, status: int, code: str | None = None):
    assert resp.status_code == status, (resp.status_code, resp.content[:300])
    if code is not None:
        assert _code(resp) == code, resp.content[:300]


def _batches(project) -> int:
    return IngestBatch.objects.filter(project=project).count()


# --- the checks, per requirement -------------------------------------------------------------------


def no_credentials_401(e, m, w):
    _refused(_call(w.anonymous, m, e, w), 401, "not_authenticated")


def anyone_is_answered(e, m, w):
    resp = _call(w.anonymous, m, e, w)
    assert resp.status_code < 400, resp.status_code


def a_person_without_roles_is_answered(e, m, w):
    assert _call(w.person(w.charlie), m, e, w).status_code == 200


def a_key_without_read_is_answered(e, m, w):
    assert _call(w.key(["budget"]), m, e, w).status_code == 200


def an_outsider_gets_404(e, m, w):
    audit = AuditEvent.objects.count()
    _refused(_call(w.person(w.charlie), m, e, w), 404, "not_found")
    assert AuditEvent.objects.count() == audit


def another_projects_key_gets_404(e, m, w):
    _refused(_call(w.key(ALL_SCOPES, w.globex), m, e, w), 404, "not_found")


def a_key_without_the_scope_gets_403_missing_scope(e, m, w):
    _refused(_call(w.key([s for s in ALL_SCOPES if s != e.scope]), m, e, w), 403, "missing_scope")


def an_auditor_reads(e, m, w):
    assert _call(w.person(w.bob), m, e, w).status_code == 200


def a_key_with_the_scope_reads(e, m, w):
    assert _call(w.key([e.scope]), m, e, w).status_code == 200


def _listed(resp, e, w) -> bool:
    assert resp.status_code == 200, resp.content[:300]
    return e.marker.format(**w.values) in resp.content.decode()


def an_outsider_sees_none_of_its_rows(e, m, w):
    assert not _listed(_call(w.person(w.charlie), m, e, w), e, w)


def another_projects_key_sees_none_of_its_rows(e, m, w):
    assert not _listed(_call(w.key(ALL_SCOPES, w.globex), m, e, w), e, w)


def an_auditor_sees_its_rows(e, m, w):
    assert _listed(_call(w.person(w.bob), m, e, w), e, w)


def a_key_with_the_scope_sees_its_rows(e, m, w):
    assert _listed(_call(w.key([e.scope]), m, e, w), e, w)


def a_key_gets_403_person_only(e, m, w):
    _refused(_call(w.key(ALL_SCOPES), m, e, w), 403, "person_only")


def another_projects_key_is_refused_alike(e, m, w):
    """403 person_only (a person-only view) or 404 (the project is looked up first): either way the
    same answer whether the project exists or not, and nothing changes."""
    client = w.key(ALL_SCOPES, w.globex)
    audit = AuditEvent.objects.count()
    resp = _call(client, m, e, w)
    assert (resp.status_code, _code(resp)) in ((403, "person_only"), (404, "not_found")), resp.content[:300]
    elsewhere = _call(client, m, Endpoint(e.requires, e.path.replace("{slug}", "no-such-project"), body=e.body), w)
    assert (elsewhere.status_code, _code(elsewhere)) == (resp.status_code, _code(resp))
    assert AuditEvent.objects.count() == audit


def a_read_only_role_gets_403_permission_denied(e, m, w):
    audit = AuditEvent.objects.count()
    _refused(_call(w.person(w.bob), m, e, w), 403, "permission_denied")
    assert AuditEvent.objects.count() == audit


def a_person_with_the_permission_may(e, m, w):
    holder = w.alice if e.requires == PERSON_WRITE else w.root
    resp = _call(w.person(holder), m, e, w)
    assert 200 <= resp.status_code < 300, (resp.status_code, resp.content[:300])


def a_person_without_the_permission_gets_403_permission_denied(e, m, w):
    for person in (w.charlie, w.bob):
        _refused(_call(w.person(person), m, e, w), 403, "permission_denied")


def a_person_is_refused(e, m, w):
    before = _batches(w.acme)
    _refused(_call(w.person(w.alice), m, e, w), *e.person)
    assert _batches(w.acme) == before


def a_key_without_the_scope_writes_nothing(e, m, w):
    rows = e.rows or _batches
    before = rows(w.acme)
    a_key_without_the_scope_gets_403_missing_scope(e, m, w)
    assert rows(w.acme) == before


def another_projects_key_writes_into_its_own_project(e, m, w):
    rows = e.rows or _batches
    ours, theirs = rows(w.acme), rows(w.globex)
    resp = _call(w.key(ALL_SCOPES, w.globex), m, e, w)
    assert 200 <= resp.status_code < 300, (resp.status_code, resp.content[:300])
    assert rows(w.acme) == ours and rows(w.globex) == theirs + 1


def a_key_with_the_scope_writes_into_its_project(e, m, w):
    rows = e.rows or _batches
    ours = rows(w.acme)
    resp = _call(w.key([e.scope]), m, e, w)
    assert 200 <= resp.status_code < 300, (resp.status_code, resp.content[:300])
    assert rows(w.acme) == ours + 1


def a_key_with_the_scope_acts(e, m, w):
    resp = _call(w.key([e.scope]), m, e, w)
    assert 200 <= resp.status_code < 300, (resp.status_code, resp.content[:300])


def _page(resp) -> str:
    return (read_streamed(resp) if resp.streaming else resp.content).decode()


def _globex_auditor(w):
    from apps.projects import services
    from apps.projects.models import Role

    user, created = type(w.bob).objects.get_or_create(username="gina")
    if created:
        services.role_grant(project=w.globex, user=user, role=Role.AUDITOR, actor=None)
    return user


def _sent_to_login(resp):
    assert resp.status_code == 302 and resp["Location"].startswith("/login/?next="), (resp.status_code, resp)


def a_signed_out_visitor_is_sent_to_the_login_page(e, m, w):
    _sent_to_login(_call(Client(), m, e, w))


def an_api_key_is_not_a_person_here(e, m, w):
    """Pages read the session only: a key's Authorization header signs nobody in."""
    _sent_to_login(_call(w.key(ALL_SCOPES), m, e, w))


def an_outsider_gets_a_404_page(e, m, w):
    for person in (w.charlie, _globex_auditor(w)):
        client = Client()
        client.force_login(person)
        assert _call(client, m, e, w).status_code == 404


def an_auditor_opens_the_page(e, m, w):
    client = Client()
    client.force_login(w.bob)
    assert _call(client, m, e, w).status_code == 200


def an_outsider_sees_none_of_its_rows_on_the_page(e, m, w):
    for person in (w.charlie, _globex_auditor(w)):
        client = Client()
        client.force_login(person)
        resp = _call(client, m, e, w)
        assert resp.status_code == 200 and e.marker.format(**w.values) not in _page(resp)


def an_auditor_sees_its_rows_on_the_page(e, m, w):
    client = Client()
    client.force_login(w.bob)
    resp = _call(client, m, e, w)
    assert resp.status_code == 200 and e.marker.format(**w.values) in _page(resp)


def a_person_without_a_role_gets_403(e, m, w):
    client = Client()
    client.force_login(w.charlie)
    assert _call(client, m, e, w).status_code == 403


CHECKS = {
    PAGE_PUBLIC: [anyone_is_answered],
    PAGE_ACTION: [a_signed_out_visitor_is_sent_to_the_login_page, an_api_key_is_not_a_person_here,
                  a_person_without_a_role_gets_403, an_auditor_opens_the_page],
    PAGE_LIST: [a_signed_out_visitor_is_sent_to_the_login_page, an_api_key_is_not_a_person_here,
                an_outsider_sees_none_of_its_rows_on_the_page, an_auditor_sees_its_rows_on_the_page],
    PAGE_READ: [a_signed_out_visitor_is_sent_to_the_login_page, an_api_key_is_not_a_person_here,
                an_outsider_gets_a_404_page, an_auditor_opens_the_page],
    PUBLIC: [anyone_is_answered],
    AUTHENTICATED: [no_credentials_401, a_person_without_roles_is_answered, a_key_without_read_is_answered],
    READ: [no_credentials_401, an_outsider_gets_404, another_projects_key_gets_404,
           a_key_without_the_scope_gets_403_missing_scope, an_auditor_reads, a_key_with_the_scope_reads],
    LIST: [no_credentials_401, an_outsider_sees_none_of_its_rows, another_projects_key_sees_none_of_its_rows,
           a_key_without_the_scope_gets_403_missing_scope, an_auditor_sees_its_rows, a_key_with_the_scope_sees_its_rows],
    PERSON_READ: [no_credentials_401, a_key_gets_403_person_only, another_projects_key_is_refused_alike,
                  an_outsider_gets_404, an_auditor_reads],
    PERSON_WRITE: [no_credentials_401, a_key_gets_403_person_only, another_projects_key_is_refused_alike,
                   an_outsider_gets_404, a_read_only_role_gets_403_permission_denied, a_person_with_the_permission_may],
    PERSON_CREATE: [no_credentials_401, a_key_gets_403_person_only, a_key_without_the_scope_gets_403_missing_scope,
                    a_person_without_the_permission_gets_403_permission_denied, a_person_with_the_permission_may],
    KEY_WRITE: [no_credentials_401, a_person_is_refused, a_key_without_the_scope_writes_nothing,
                another_projects_key_writes_into_its_own_project, a_key_with_the_scope_writes_into_its_project],
    KEY_QUERY: [no_credentials_401, a_person_is_refused, a_key_without_the_scope_gets_403_missing_scope,
                a_key_with_the_scope_acts],
    KEY_ACTION: [no_credentials_401, a_person_is_refused, a_key_without_the_scope_gets_403_missing_scope,
                 another_projects_key_gets_404, a_key_with_the_scope_acts],
}

CASES = [pytest.param(key, check, id=f"{key[0]} /{key[1]}: {check.__name__}")
         for key, entry in MATRIX.items() for check in CHECKS[entry.requires]]


@pytest.mark.parametrize(("endpoint", "check"), CASES)
def test_the_endpoint_requires_what_its_entry_says(world, endpoint, check):
    method, _ = endpoint
    check(MATRIX[endpoint], method, world)


# --- the admin -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminEntry:
    scoped: bool                  # rows belong to projects: staff see only their projects' rows
    project_attr: str = "project_id"  # how a row names its project
    read_only: bool = False       # nobody adds, changes or deletes (superusers included)
    view_by_role: bool = False    # holding a role is enough to view (no model permission needed)
    note: str = ""


RUN_LOG = AdminEntry(scoped=True, read_only=True, view_by_role=True)
ADMIN_MATRIX: dict[str, AdminEntry] = {
    "auth.User": AdminEntry(scoped=False, note="people: superusers and Django's model permissions"),
    "auth.Group": AdminEntry(scoped=False, note="role groups: superusers only (their names tell every project)"),
    "projects.Project": AdminEntry(scoped=True, project_attr="pk"),
    "projects.ApiKey": AdminEntry(scoped=True),
    "audit.AuditEvent": AdminEntry(scoped=True, read_only=True),
    "traces.Run": RUN_LOG,
    "traces.Span": RUN_LOG,
    "traces.ToolCall": RUN_LOG,
    "traces.IngestBatch": RUN_LOG,
    "traces.DeadRecord": RUN_LOG,
    # costs: derived rows read-only for every role; prices and settings edited by project admins
    "budgets.SpanCost": RUN_LOG,
    "budgets.CostDay": RUN_LOG,
    "budgets.CostSpike": RUN_LOG,
    "budgets.PriceOverride": AdminEntry(scoped=True, view_by_role=True),
    "budgets.CostSettings": AdminEntry(scoped=True, view_by_role=True),
    "budgets.Budget": AdminEntry(scoped=True, view_by_role=True),
    "budgets.BudgetLedger": RUN_LOG,
    "budgets.Reservation": RUN_LOG,
    "budgets.BudgetAlert": RUN_LOG,
    # approvals: rules edited by project admins; requests and decisions read-only (decided on the page, the API)
    "approvals.ApprovalRule": AdminEntry(scoped=True, view_by_role=True),
    "approvals.Approval": RUN_LOG,
    "approvals.Decision": RUN_LOG,
    # the gateway's upstreams: edited by project admins (the gateway's own endpoints: tests/gateway/)
    "gateway.Upstream": AdminEntry(scoped=True, view_by_role=True),
    # evals: configurations edited by project admins; scores and the after-run outbox read-only
    "evals.EvalConfig": AdminEntry(scoped=True, view_by_role=True),
    "evals.EvalScore": RUN_LOG,
    "evals.EvalPending": RUN_LOG,
    "evals.EvalJob": AdminEntry(scoped=True, view_by_role=True),
    "evals.EvalJobRun": RUN_LOG,
    # the GPU queue: devices and backends edited by project admins; tasks, their history, loaded models and
    # the operators' controls read-only (steered on the queue page and over the API)
    "scheduler.Device": AdminEntry(scoped=True, view_by_role=True),
    "scheduler.Backend": AdminEntry(scoped=True, view_by_role=True),
    "scheduler.LoadedModel": RUN_LOG,
    "scheduler.QueueTask": RUN_LOG,
    "scheduler.DispatchEvent": RUN_LOG,
    "scheduler.Control": RUN_LOG,
    # beat's schedule (django-celery-beat): superusers and Django's model permissions; a job's cron is
    # edited on the job (its PeriodicTask follows)
    "django_celery_beat.PeriodicTask": AdminEntry(scoped=False, note="beat's entries: superusers"),
    "django_celery_beat.IntervalSchedule": AdminEntry(scoped=False, note="beat's intervals: superusers"),
    "django_celery_beat.CrontabSchedule": AdminEntry(scoped=False, note="beat's crons: superusers"),
    "django_celery_beat.SolarSchedule": AdminEntry(scoped=False, note="beat's solar events: superusers"),
    "django_celery_beat.ClockedSchedule": AdminEntry(scoped=False, note="beat's one-offs: superusers"),
}


def test_every_admin_has_an_entry():
    registered = {model._meta.label: model_admin for model, model_admin in admin.site._registry.items()}
    missing = sorted(registered.keys() - ADMIN_MATRIX.keys())
    stale = sorted(ADMIN_MATRIX.keys() - registered.keys())
    assert not missing, "admins without an entry in ADMIN_MATRIX (say what each shows to whom): " + ", ".join(missing)
    assert not stale, "ADMIN_MATRIX entries for admins no longer registered: " + ", ".join(stale)
    unscoped = sorted(label for label, entry in ADMIN_MATRIX.items()
                      if entry.scoped and not isinstance(registered[label], ScopedAdminMixin))
    assert not unscoped, "project-owned admins not built on ScopedAdminMixin: " + ", ".join(unscoped)


@pytest.fixture
def admin_world(world):
    """``world`` plus a dead record in each project (the other admins' rows come with the runs)."""
    for p in (world.acme, world.globex):
        batch = IngestBatch.objects.filter(project=p).first()
        DeadRecord.objects.create(project=p, batch_public_id=batch.public_id, batch_pk=batch.pk, source="rest",
                                  position=0, op="span", run_ref=f"{p.slug}-run-1", raw=b"{}",
                                  error_code="invalid_record", error="matrix")
    return world


def _model(label: str):
    return next(m for m in admin.site._registry if m._meta.label == label)


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _staff(user, model, *, view_perm: bool):
    user.is_staff = True
    user.save()
    if view_perm:
        user.user_permissions.add(Permission.objects.get(
            content_type=ContentType.objects.get_for_model(model), codename=f"view_{model._meta.model_name}"))
    c = Client()
    c.force_login(user)
    return c


def _changelist_projects(client, model, entry) -> set:
    resp = client.get(_url(model, "changelist"))
    assert resp.status_code == 200, resp.status_code
    return set(resp.context["cl"].queryset.values_list(entry.project_attr, flat=True))


def admin_an_outsider_staff_sees_no_row(label, entry, w):
    model = _model(label)
    assert _changelist_projects(_staff(w.charlie, model, view_perm=True), model, entry) == set()


def admin_an_outsider_staff_without_permissions_is_refused(label, entry, w):
    model = _model(label)
    assert _staff(w.charlie, model, view_perm=False).get(_url(model, "changelist")).status_code == 403


def admin_an_auditor_sees_only_their_projects_rows(label, entry, w):
    model = _model(label)
    client = _staff(w.bob, model, view_perm=not entry.view_by_role)
    assert _changelist_projects(client, model, entry) == {w.acme.pk}
    theirs = model._default_manager.filter(**{entry.project_attr: w.globex.pk}).first()
    assert theirs is not None
    assert client.get(_url(model, "change", theirs.pk)).status_code in (302, 404)


def admin_a_role_alone_gives_no_view(label, entry, w):
    model = _model(label)
    assert _staff(w.bob, model, view_perm=False).get(_url(model, "changelist")).status_code == 403


def admin_nobody_adds_changes_or_deletes(label, entry, w):
    model = _model(label)
    client = Client()
    client.force_login(w.root)
    ours = model._default_manager.filter(**{entry.project_attr: w.acme.pk}).first()
    assert client.get(_url(model, "add")).status_code == 403
    assert client.post(_url(model, "change", ours.pk), {}).status_code == 403
    assert client.post(_url(model, "delete", ours.pk), {"post": "yes"}).status_code == 403
    assert model._default_manager.filter(pk=ours.pk).exists()


def _admin_checks(entry: AdminEntry) -> list:
    if not entry.scoped:
        return [admin_an_outsider_staff_without_permissions_is_refused]
    checks = [admin_an_outsider_staff_sees_no_row, admin_an_auditor_sees_only_their_projects_rows]
    checks.append(admin_an_outsider_staff_without_permissions_is_refused if entry.view_by_role
                  else admin_a_role_alone_gives_no_view)
    if entry.read_only:
        checks.append(admin_nobody_adds_changes_or_deletes)
    return checks


ADMIN_CASES = [pytest.param(label, check, id=f"admin {label}: {check.__name__.removeprefix('admin_')}")
               for label, entry in ADMIN_MATRIX.items() for check in _admin_checks(entry)]


@pytest.mark.parametrize(("label", "check"), ADMIN_CASES)
def test_the_admin_shows_what_its_entry_says(admin_world, label, check):
    check(label, ADMIN_MATRIX[label], admin_world)
