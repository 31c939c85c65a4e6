"""The run log in the admin: read-only, scoped to the viewer's projects, no unbounded COUNT(*), CSV export."""
from __future__ import annotations

import csv
import io
import json
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.audit.models import AuditEvent
from apps.traces.models import DeadRecord, IngestBatch, Run, Span
from tests.streaming import read_streamed

from .helpers import accept, at, drain

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser("root", password="pw-root")


def post(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def csv_rows(resp) -> list[dict]:
    """Read a streamed export the way the ASGI server does (its rows come from an async iterator)."""
    return list(csv.DictReader(io.StringIO(read_streamed(resp).decode())))


@pytest.fixture
def traffic(project, other_project, make_key, key_client):
    ours, theirs = key_client(make_key(project)[1]), key_client(make_key(other_project)[1])
    post(ours, "/api/v1/runs", {"run_id": "ok-run", "agent": "support-bot", "end_user": "user-1", "started_at": at(0)})
    post(ours, "/api/v1/runs/ok-run/spans", [
        {"span_id": "llm-a", "kind": "llm", "provider": "openai", "model": "gpt-4o", "start_time": at(1),
         "end_time": at(2), "status": "ok", "usage": {"input_tokens": 10, "output_tokens": 5}},
        {"span_id": "tool-a", "kind": "tool", "tool": {"name": "lookup", "arguments": {"q": 1}}, "start_time": at(3),
         "end_time": at(4), "status": "ok"}])
    post(ours, "/api/v1/runs/ok-run/finish", {"status": "completed"})
    post(ours, "/api/v1/runs", {"run_id": "bad-run", "agent": "=HYPERLINK(\"http://evil\")", "started_at": at(10),
                                "end_user": "+cmd|' /C calc'!A0", "session_id": "@SUM(1+1)"})
    post(ours, "/api/v1/runs/bad-run/finish", {"status": "failed", "error_code": "boom"})
    post(theirs, "/api/v1/runs", {"run_id": "globex-secret-run", "agent": "their-bot", "started_at": at(5)})
    post(theirs, "/api/v1/runs/globex-secret-run/spans", {"span_id": "their-span", "kind": "llm", "start_time": at(5)})
    drain()


def test_every_run_log_admin_lists_filters_and_searches(client, root, traffic):
    client.force_login(root)
    for url, expect in [
        ("/admin/traces/run/", "ok-run"),
        ("/admin/traces/run/?status__exact=failed", "bad-run"),
        ("/admin/traces/run/?q=user-1", "ok-run"),
        ("/admin/traces/run/?started_at__year=2026&started_at__month=11&started_at__day=24", "ok-run"),
        ("/admin/traces/span/", "llm-a"),
        ("/admin/traces/span/?kind__exact=tool", "tool-a"),
        ("/admin/traces/span/?q=gpt-4o", "llm-a"),
        ("/admin/traces/span/?start_time__year=2026", "llm-a"),
        ("/admin/traces/toolcall/", "lookup"),
        ("/admin/traces/ingestbatch/?status__exact=done", "rest"),
    ]:
        resp = client.get(url)
        assert resp.status_code == 200, url
        assert expect in resp.content.decode(), url
    assert "bad-run" not in client.get("/admin/traces/run/?status__exact=completed").content.decode()
    for odd in ("%C2%B2", "x", "99999"):  # a superscript two is a digit to str.isdigit, not to int()
        assert client.get(f"/admin/traces/run/?project={odd}").status_code == 200
    run = Run.objects.get(run_id="ok-run")
    page = client.get(f"/admin/traces/run/{run.pk}/change/").content.decode()
    assert "2 spans (0 errors)" in page and "support-bot" in page


def test_the_date_hierarchy_lists_periods_without_scanning_for_distinct_dates(client, root, traffic, project,
                                                                            make_key, key_client):
    client.force_login(root)
    agent = key_client(make_key(project)[1])
    post(agent, "/api/v1/runs", {"run_id": "far-future", "started_at": "2999-12-31T23:59:59Z"})
    post(agent, "/api/v1/runs", {"run_id": "epoch", "started_at": "1970-01-01T00:00:00Z"})
    drain()
    top = client.get("/admin/traces/run/")
    assert top.status_code == 200
    years = set(re.findall(r"started_at__year=(\d+)", top.content.decode()))
    assert years == {"1970", "2026", "2999"}  # only the years that hold runs
    for url in ("/admin/traces/run/?started_at__year=2999", "/admin/traces/run/?started_at__year=2999&started_at__month=12"):
        assert "far-future" in client.get(url).content.decode()
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/traces/span/?start_time__year=2026").content.decode()
    assert "November 2026" in page
    sql = " ".join(q["sql"].upper() for q in queries)
    assert "DISTINCT" not in sql and "DATE_TRUNC" not in sql and "DJANGO_DATETIME_TRUNC" not in sql


def test_the_span_list_never_counts_the_whole_table(client, root, traffic):
    client.force_login(root)
    for url in ("/admin/traces/span/", "/admin/traces/span/?kind__exact=llm", "/admin/traces/run/"):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(url).status_code == 200
        counts = [q["sql"] for q in queries if "COUNT(" in q["sql"].upper()]
        assert counts, "the paginator counts (bounded)"
        for sql in counts:
            assert "LIMIT" in sql.upper(), sql  # COUNT(*) FROM (SELECT ... LIMIT 10000)


def test_the_run_log_admin_is_read_only(client, root, traffic):
    client.force_login(root)
    run = Run.objects.get(run_id="ok-run")
    span = Span.objects.get(span_id="llm-a")
    assert client.get("/admin/traces/run/add/").status_code == 403
    client.post(f"/admin/traces/run/{run.pk}/change/", {"status": "cancelled", "end_user": "mallory"})
    assert client.post(f"/admin/traces/run/{run.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.post(f"/admin/traces/span/{span.pk}/delete/", {"post": "yes"}).status_code == 403
    run.refresh_from_db()
    assert (run.status, run.end_user) == ("completed", "user-1")


def test_csv_export_of_a_filtered_list_is_audited_and_safe_for_spreadsheets(client, root, traffic):
    client.force_login(root)
    resp = client.get("/admin/traces/run/export.csv?status__exact=failed")
    assert resp.status_code == 200 and resp["Content-Type"].startswith("text/csv")
    rows = csv_rows(resp)
    assert [r["run_id"] for r in rows] == ["bad-run"]
    # A formula would run in a spreadsheet: every such cell is neutralised.
    assert rows[0]["agent_name"].startswith("'=") and rows[0]["end_user"].startswith("'+")
    assert rows[0]["session_id"].startswith("'@")
    assert rows[0]["error_code"] == "boom"
    event = AuditEvent.objects.get(action="traces.exported")
    assert event.actor_repr == "root" and "status__exact=failed" in json.dumps(event.after)

    spans = csv_rows(client.get("/admin/traces/span/export.csv?kind__exact=llm"))
    assert {s["span_id"] for s in spans} == {"llm-a", "their-span"}
    assert client.get("/admin/traces/run/export.csv?nonsense=1").status_code == 400


def test_an_auditor_sees_only_their_projects_rows(client, bob, charlie, traffic):
    bob.is_staff = True  # auditor of acme; no model permissions granted by hand
    bob.save()
    client.force_login(bob)
    ours_batch = str(IngestBatch.objects.filter(project__slug="acme").first().public_id)
    their_batch = str(IngestBatch.objects.filter(project__slug="globex").first().public_id)
    for url, ours, theirs in [("/admin/traces/run/", "ok-run", "globex-secret-run"),
                              ("/admin/traces/span/", "llm-a", "their-span"),
                              ("/admin/traces/ingestbatch/", ours_batch, their_batch),
                              ("/admin/traces/toolcall/", "lookup", "globex")]:
        page = client.get(url)
        assert page.status_code == 200
        assert ours in page.content.decode() and theirs not in page.content.decode(), url
    export = {r["run_id"] for r in csv_rows(client.get("/admin/traces/run/export.csv"))}
    assert export == {"ok-run", "bad-run"}
    theirs = Run.objects.get(run_id="globex-secret-run")
    assert client.get(f"/admin/traces/run/{theirs.pk}/change/").status_code in (302, 404)

    charlie.is_staff = True  # staff, but no role anywhere: nothing to see
    charlie.save()
    client.force_login(charlie)
    assert client.get("/admin/traces/run/").status_code == 403
    assert client.get("/admin/traces/run/export.csv").status_code == 403


def test_a_dead_lettered_batch_shows_its_reason_in_the_inbox_admin(client, root, project, make_key):
    key = make_key(project)[0]
    accept(project, key, [{"op": "launch.rockets", "run_id": "x"}])  # undecodable: dead as a whole
    accept(project, key, [{"op": "run.start", "run_id": "y", "started_at": "not a time"}])  # one record at fault
    drain()
    batch = IngestBatch.objects.get(status="dead")
    client.force_login(root)
    listing = client.get("/admin/traces/ingestbatch/?status__exact=dead").content.decode()
    assert "invalid_record" in listing
    detail = client.get(f"/admin/traces/ingestbatch/{batch.pk}/change/").content.decode()
    assert "invalid_record" in detail and "launch.rockets" in detail
    dead = DeadRecord.objects.get()
    detail = client.get(f"/admin/traces/deadrecord/{dead.pk}/change/").content.decode()
    assert "invalid_record" in detail and "not a time" in detail
