"""The audit log page: a person's projects' events, newest first with a cursor, filters in the URL, the
chain's tip and its verification, and audited CSV/JSON exports of the filtered list."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.audit.services import Actor, audit_record
from tests.audit.tampering import bypass_triggers
from tests.streaming import read_streamed

pytestmark = pytest.mark.django_db

ACME_EVENTS = 120  # more than two pages of 50


def _record(i: int, project=None, repr_: str = "") -> AuditEvent:
    return audit_record(
        actor=Actor(type=AuditEvent.ActorType.USER, id=str(i), repr=f"tester{i % 3}", role="operator"),
        action="widget.made" if i % 2 else "widget.broken", object_type="tests.widget", object_id=i,
        object_repr=repr_ or f"acme widget {i}", project_id=project.pk if project else None,
        project_slug=project.slug if project else "", before={"n": i}, after={"n": i + 1, "note": "<b>"})


@pytest.fixture
def events(project, other_project):
    """acme: its own setup events and ACME_EVENTS widgets; globex: two secret ones; one of no project."""
    for i in range(ACME_EVENTS):
        _record(i, project)
    _record(1, other_project, "globex-secret widget")
    _record(2, other_project, "globex-secret gadget")
    _record(3, None, "system-secret sweep")


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser("root", password="pw-root")


def seqs(resp) -> list[int]:
    return [e.seq for e in resp.context["events"]]


def walk(client, url: str) -> list[int]:
    """Every seq listed by following the "Older" links from ``url`` to the last page."""
    found: list[int] = []
    while url:
        resp = client.get(url)
        assert resp.status_code == 200
        found += seqs(resp)
        url = _older_link(resp)
    return found


def _older_link(resp) -> str | None:
    html = resp.content.decode()
    marker = 'rel="next"'
    if marker not in html:
        return None
    href = html[:html.index(marker)].rsplit('href="', 1)[1].split('"', 1)[0]
    return "/audit/" + href.replace("&amp;", "&")


def streamed(resp) -> str:
    return read_streamed(resp).decode()


def test_an_auditor_sees_their_projects_events_and_not_another_projects(client, bob, project, events):
    client.force_login(bob)
    resp = client.get("/audit/")
    assert resp.status_code == 200
    html = resp.content.decode()
    assert f"acme widget {ACME_EVENTS - 1}" in html and "tester2" in html and "(operator)" in html
    assert "globex-secret" not in html and "system-secret" not in html
    assert "&lt;b&gt;" in html and "<b>" not in html  # before/after are escaped
    newest = AuditEvent.objects.filter(project_id=project.pk).order_by("-seq")
    assert seqs(resp) == list(newest.values_list("seq", flat=True)[:50])


def test_an_outsider_sees_no_events_and_is_told_they_hold_no_role(client, charlie, events):
    client.force_login(charlie)
    resp = client.get("/audit/")
    assert resp.status_code == 200
    html = resp.content.decode()
    assert "You hold no role in any project" in html
    assert "widget" not in html and "Verify the chain" not in html and "Export CSV" not in html
    assert client.post("/audit/").status_code == 403  # verifying is for people with a role
    assert json.loads(streamed(client.get("/audit/export.json"))) == []
    assert AuditEvent.objects.get(action="audit.exported").actor_repr == "charlie"


@pytest.mark.parametrize("method, url", [("get", "/audit/"), ("post", "/audit/"), ("get", "/audit/export.csv"),
                                         ("get", "/audit/export.json")])
def test_anonymous_is_redirected_to_the_login_page(client, events, method, url):
    resp = getattr(client, method)(url)
    assert resp.status_code == 302 and resp["Location"].startswith("/login/?next=/audit/")


def test_a_superuser_sees_every_project_and_the_events_of_no_project(client, root, events):
    client.force_login(root)
    assert walk(client, "/audit/") == list(AuditEvent.objects.order_by("-seq").values_list("seq", flat=True))
    html = client.get("/audit/?actor=tester").content.decode()
    assert "system-secret" in html and "globex-secret" in html


def test_filters_narrow_the_list_and_stay_in_the_pagination_links(client, bob, events):
    client.force_login(bob)
    query = "action=widget.made&actor=TESTER&object_type=tests.widget"
    resp = client.get(f"/audit/?{query}")
    assert resp.status_code == 200
    listed = list(resp.context["events"])
    assert len(listed) == 50 and all(e.action == "widget.made" and e.actor_repr.startswith("tester") for e in listed)
    older = _older_link(resp)
    assert all(part in older for part in ("action=widget.made", "actor=TESTER", "object_type=tests.widget", "before="))
    assert len(walk(client, f"/audit/?{query}")) == ACME_EVENTS // 2
    assert {e.actor_repr for e in client.get("/audit/?actor=ester1").context["events"]} == {"tester1"}

    # A prefix, and the pages' links keep it.
    resp = client.get("/audit/?action=widget.*")
    assert {e.action for e in resp.context["events"]} == {"widget.made", "widget.broken"}
    assert "action=widget.%2A" in _older_link(resp)
    assert set(walk(client, "/audit/?action=widget.*")) == set(
        AuditEvent.objects.filter(project_slug="acme", action__startswith="widget.").values_list("seq", flat=True))
    assert seqs(client.get("/audit/?action=widget")) == []  # without "*", exact

    newest = AuditEvent.objects.filter(project_slug="acme").latest("seq")
    day = timezone.localtime(newest.created_at).date()
    assert seqs(client.get(f"/audit/?date_from={day}&date_to={day}"))[0] == newest.seq
    assert seqs(client.get(f"/audit/?date_from={day + dt.timedelta(days=1)}")) == []
    assert seqs(client.get(f"/audit/?date_to={day - dt.timedelta(days=1)}")) == []
    assert seqs(client.get("/audit/?project=acme&object_type=projects.project")) == list(
        AuditEvent.objects.filter(project_slug="acme", object_type="projects.project").values_list("seq", flat=True))


@pytest.mark.parametrize("query, message", [
    ("project=globex", "No project of yours has this slug."),  # exists, not theirs: the same answer as...
    ("project=initech", "No project of yours has this slug."),  # ...one that does not exist
    ("project=Not%20a%20slug", "No project of yours has this slug."),
    ("action=drop%20table%3B", "An action is letters"),
    ("object_type=tests%2Fwidget", "An object type is app.model"),
    ("actor=a%00b", "Null characters are not allowed."),
    ("date_from=2024-13-45", "Enter a valid date."),
    ("date_from=2024-05-02&date_to=2024-05-01", "“From” is after “To”."),
    ("action=" + "x" * 65, "at most 64 characters"),
])
def test_unknown_or_malformed_filters_are_shown_as_form_errors(client, bob, events, query, message):
    client.force_login(bob)
    resp = client.get(f"/audit/?{query}")
    assert resp.status_code == 200
    assert message in resp.content.decode() and seqs(resp) == []
    assert client.get(f"/audit/export.csv?{query}").status_code == 400


def test_the_ends_of_the_calendar_are_valid_dates(client, bob, events):
    client.force_login(bob)
    assert len(seqs(client.get("/audit/?date_from=0001-01-01&date_to=9999-12-31"))) == 50


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "99999999999999999999", "٣"])
def test_a_malformed_cursor_is_a_404(client, bob, events, cursor):
    client.force_login(bob)
    assert client.get("/audit/", {"before": cursor}).status_code == 404


def test_cursor_pagination_walks_every_event_once_newest_first(client, bob, events):
    client.force_login(bob)
    found = walk(client, "/audit/")
    acme = list(AuditEvent.objects.filter(project_slug="acme").order_by("-seq").values_list("seq", flat=True))
    assert len(acme) > 2 * 50 and found == acme
    last = client.get(f"/audit/?before={acme[-1]}")
    assert seqs(last) == [] and "No older events." in last.content.decode()


def test_the_csv_export_holds_only_visible_events_and_is_audited(client, bob, events):
    client.force_login(bob)
    resp = client.get("/audit/export.csv?action=widget.*&before=5")  # the cursor is ignored: the whole list
    assert resp.status_code == 200 and resp["Content-Type"].startswith("text/csv")
    assert resp["Content-Disposition"].startswith('attachment; filename="audit-')
    rows = list(csv.DictReader(io.StringIO(streamed(resp))))
    assert [int(r["seq"]) for r in rows] == list(AuditEvent.objects.filter(
        project_slug="acme", action__startswith="widget.").order_by("-seq").values_list("seq", flat=True))
    assert len(rows) == ACME_EVENTS and {r["project_slug"] for r in rows} == {"acme"}
    assert json.loads(rows[0]["after"])["note"] == "<b>"
    exported = AuditEvent.objects.get(action="audit.exported")
    assert (exported.actor_repr, exported.object_type, exported.project_id) == ("bob", "audit.auditevent", None)
    assert exported.after == {"format": "csv", "query": "action=widget.%2A&before=5"}


def test_the_json_export_is_an_exact_copy_whose_hashes_recompute(client, bob, project, events, settings):
    client.force_login(bob)
    resp = client.get("/audit/export.json?project=acme")
    assert resp.status_code == 200 and resp["Content-Type"].startswith("application/json")
    rows = json.loads(streamed(resp))
    # Audited under acme before streaming: the export lists its own record first.
    exported = AuditEvent.objects.get(action="audit.exported")
    assert exported.project_id == project.pk and exported.project_slug == "acme"
    assert rows[0]["seq"] == exported.seq and rows[0]["action"] == "audit.exported"
    assert [r["seq"] for r in rows] == list(
        AuditEvent.objects.filter(project_id=project.pk).order_by("-seq").values_list("seq", flat=True))
    assert not any("secret" in r["object_repr"] for r in rows)
    for row in rows:
        stored = row.pop("hash")
        row["created_at"] = dt.datetime.fromisoformat(row["created_at"])
        assert AuditEvent(**row).compute_hash() == stored


def test_an_empty_export_is_still_a_valid_document(client, bob, events):
    client.force_login(bob)
    assert json.loads(streamed(client.get("/audit/export.json?action=nothing.here"))) == []
    assert streamed(client.get("/audit/export.csv?action=nothing.here")).startswith("seq,created_at,")
    assert client.get("/audit/export.xml").status_code == 404


def test_the_page_shows_the_chain_tip(client, bob, events):
    client.force_login(bob)
    tip = AuditEvent.objects.order_by("-seq").first()  # a project-less row: its place and hash only
    html = client.get("/audit/").content.decode()
    assert f"#{tip.seq}" in html and tip.hash in html and "system-secret" not in html


def test_verify_reports_an_intact_chain_and_records_nothing(client, bob, events):
    client.force_login(bob)
    before = AuditEvent.objects.count()
    resp = client.post("/audit/?action=widget.made")
    assert resp.status_code == 200
    report = resp.context["report"]
    tip = AuditEvent.objects.order_by("-seq").first()
    assert report.ok and report.rows_checked == before and (report.tip.seq, report.tip.hash) == (tip.seq, tip.hash)
    html = resp.content.decode()
    assert "intact" in html and tip.hash in html
    assert {e.action for e in resp.context["events"]} == {"widget.made"}  # the page's filters still apply
    assert AuditEvent.objects.count() == before


def test_verify_reports_the_break_after_a_row_is_tampered(client, bob, events):
    target = AuditEvent.objects.filter(project_slug="globex").first()  # another project's row
    bypass_triggers()
    AuditEvent.objects.filter(pk=target.pk).update(object_repr="mallory was here")
    client.force_login(bob)
    resp = client.post("/audit/")
    report = resp.context["report"]
    assert not report.ok and [(b.seq, b.reason) for b in report.breaks] == [
        (target.seq, "content does not match its hash (row edited)")]
    html = resp.content.decode()
    assert "broken" in html and f"#{target.seq}" in html and "row edited" in html
    assert "mallory" not in html  # the break is named, another project's row is not shown


def test_the_page_asks_a_fixed_number_of_queries(client, bob, root, events, django_assert_max_num_queries):
    """Session, user, roles, the project picker, one page of events, the chain's tip; a superuser's
    ``?project=`` adds the slug's lookup (a person's slugs come with their roles)."""
    deep = AuditEvent.objects.filter(project_slug="acme").order_by("seq")[10].seq
    urls = ("/audit/", "/audit/?action=widget.*&actor=tester&date_from=2000-01-01",
            f"/audit/?project=acme&before={deep}")
    for person, queries in ((bob, 6), (root, 7)):
        client.force_login(person)
        for url in urls:
            with django_assert_max_num_queries(queries):
                assert client.get(url).status_code == 200
