"""Project settings (name, redaction) over the API and the admin: admins only, validated, audited."""
from __future__ import annotations

import pytest

from apps.audit.models import AuditEvent
from apps.projects.models import Project

pytestmark = pytest.mark.django_db

PATTERNS = [{"name": "EMPLOYEE_ID", "pattern": r"EMP-\d{6}"}]


def test_an_admin_changes_redaction_settings_and_it_is_audited(project, alice, client_for):
    r = client_for(alice).patch("/api/v1/projects/acme", {"redaction_patterns": PATTERNS,
                                                          "redaction_exempt_attributes": ["http.client_ip"]},
                                format="json")
    assert r.status_code == 200, r.content
    assert r.json()["redaction_patterns"] == PATTERNS and r.json()["redaction_enabled"] is True
    project.refresh_from_db()
    assert project.redaction_patterns == PATTERNS and project.redaction_exempt_attributes == ["http.client_ip"]
    event = AuditEvent.objects.filter(action="project.updated").get()
    assert event.actor_repr == "alice" and event.before == {"redaction_patterns": [],
                                                            "redaction_exempt_attributes": []}
    assert event.after["redaction_patterns"] == PATTERNS

    # The same values again change nothing and audit nothing.
    assert client_for(alice).patch("/api/v1/projects/acme", {"redaction_patterns": PATTERNS},
                                   format="json").status_code == 200
    assert AuditEvent.objects.filter(action="project.updated").count() == 1


@pytest.mark.parametrize("body", [
    {"redaction_patterns": [{"name": "X", "pattern": "("}]},
    {"redaction_patterns": [{"name": "lower", "pattern": "x"}]},
    {"redaction_patterns": [{"name": "X", "pattern": "a*"}]},
    {"redaction_enabled": "perhaps"},
])
def test_bad_settings_are_refused_and_nothing_changes(project, alice, client_for, body):
    r = client_for(alice).patch("/api/v1/projects/acme", body, format="json")
    assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", r.content
    project.refresh_from_db()
    assert project.redaction_patterns == [] and project.redaction_enabled is True
    assert not AuditEvent.objects.filter(action="project.updated").exists()


def test_auditors_outsiders_and_keys_may_not_change_settings(project, bob, charlie, client_for, make_key,
                                                            key_client, api_client):
    body = {"redaction_enabled": False}
    assert client_for(bob).patch("/api/v1/projects/acme", body, format="json").status_code == 403
    assert client_for(charlie).patch("/api/v1/projects/acme", body, format="json").status_code == 404
    assert api_client.patch("/api/v1/projects/acme", body, format="json").status_code in (401, 403)
    _, raw = make_key(project, scopes=["read", "ingest"])
    r = key_client(raw).patch("/api/v1/projects/acme", body, format="json")
    assert r.status_code == 403 and r.json()["error_code"] == "person_only"
    assert Project.objects.get(slug="acme").redaction_enabled is True


def test_changing_settings_in_the_admin_is_audited_and_validated(project, admin_client):
    url = f"/admin/projects/project/{project.pk}/change/"
    form = {"name": "Acme Corp", "redaction_enabled": "on", "redaction_patterns": '[{"name": "X", "pattern": "("}]',
            "redaction_exempt_attributes": "[]", "time_zone": "UTC", "webhook_allowlist": "[]",
            "roles-TOTAL_FORMS": "0", "roles-INITIAL_FORMS": "0", "roles-MIN_NUM_FORMS": "0",
            "roles-MAX_NUM_FORMS": "1000"}
    r = admin_client.post(url, form)
    assert r.status_code == 200 and "not a valid regular expression" in r.content.decode()
    form["redaction_patterns"] = '[{"name": "X", "pattern": "EMP-\\\\d+"}]'
    r = admin_client.post(url, form)
    assert r.status_code == 302, r.content.decode()[:3000]
    project.refresh_from_db()
    assert project.name == "Acme Corp" and project.redaction_patterns == [{"name": "X", "pattern": "EMP-\\d+"}]
    event = AuditEvent.objects.filter(action="project.updated").get()
    assert event.before["name"] == "Acme" and event.after["name"] == "Acme Corp"


def test_a_time_zone_and_a_webhook_allowlist_are_validated_and_audited(project, alice, client_for):
    for body, field in (({"time_zone": "Mars/Olympus"}, "time_zone"),
                        ({"webhook_allowlist": ["ftp://files.example.com/"]}, "webhook_allowlist"),
                        ({"webhook_allowlist": ["https://"]}, "webhook_allowlist")):
        r = client_for(alice).patch("/api/v1/projects/acme", body, format="json")
        assert r.status_code == 400 and r.json()["error_code"] == "invalid_request", (body, r.content)
        assert field in r.content.decode()
    r = client_for(alice).patch("/api/v1/projects/acme", {"time_zone": "Europe/Paris",
                                                          "webhook_allowlist": ["https://hooks.example.com/"]},
                                format="json")
    assert r.status_code == 200 and r.json()["time_zone"] == "Europe/Paris"
    event = AuditEvent.objects.filter(action="project.updated").latest("seq")
    assert event.before == {"time_zone": "UTC", "webhook_allowlist": []}
    assert event.after == {"time_zone": "Europe/Paris", "webhook_allowlist": ["https://hooks.example.com/"]}


def test_the_webhook_secret_is_rotated_by_admins_shown_once_and_never_audited(project, alice, bob, client_for,
                                                                               make_key, key_client):
    old = Project.objects.get(pk=project.pk).webhook_secret
    r = client_for(alice).post("/api/v1/projects/acme/webhook-secret")
    assert r.status_code == 200
    secret = r.json()["webhook_secret"]
    assert len(secret) == 64 and secret != old and Project.objects.get(pk=project.pk).webhook_secret == secret
    assert "webhook_secret" not in client_for(alice).get("/api/v1/projects/acme").json()
    event = AuditEvent.objects.filter(action="project.webhook_secret_rotated").get()
    assert secret not in str(event.before) + str(event.after)
    assert client_for(bob).post("/api/v1/projects/acme/webhook-secret").status_code == 403
    r = key_client(make_key(project, scopes=["read", "ingest"])[1]).post("/api/v1/projects/acme/webhook-secret")
    assert r.status_code == 403 and r.json()["error_code"] == "person_only"
