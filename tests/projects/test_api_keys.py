"""API keys: hashed at rest, accepted in both headers, refused when wrong, revoked or expired."""
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.projects import services
from apps.projects.models import ApiKey

pytestmark = pytest.mark.django_db


def _every_text_in_the_database() -> str:
    """Every value of every row of every table, as text."""
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            chunks.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(chunks)


def test_the_secret_is_nowhere_in_the_database(project, make_key):
    key, raw = make_key(project)
    secret_part = raw[len("cp_live_") + 12:]  # everything past the indexed lookup prefix
    dump = _every_text_in_the_database()
    assert raw.startswith("cp_live_") and len(raw) == len("cp_live_") + 40
    assert key.key_hash in dump  # the dump is real: it does contain the hash
    assert raw not in dump
    assert secret_part not in dump


def test_keys_are_hashed_with_a_key_so_a_plain_sha256_does_not_match(project, make_key):
    import hashlib

    key, raw = make_key(project)
    assert key.key_hash != hashlib.sha256(raw.encode()).hexdigest()


@pytest.mark.parametrize("header", ["bearer", "x-api-key"])
def test_a_key_is_accepted_in_either_header(project, make_key, key_client, header):
    _, raw = make_key(project, scopes=["read"])
    resp = key_client(raw, header).get("/api/v1/me")
    assert resp.status_code == 200
    assert resp.json() == {"type": "api_key", "project": "acme", "scopes": ["read"],
                           "key_prefix": resp.json()["key_prefix"]}
    assert raw.startswith(resp.json()["key_prefix"].rstrip("…"))


def test_use_sets_last_used_at(project, make_key, key_client):
    key, raw = make_key(project)
    assert key.last_used_at is None
    key_client(raw).get("/api/v1/me")
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_no_credentials_is_401(api_client):
    resp = api_client.get("/api/v1/me")
    assert resp.status_code == 401
    assert resp.json()["error_code"] == "not_authenticated"
    assert "Bearer" in resp["WWW-Authenticate"]


@pytest.mark.parametrize("raw", ["nonsense", "cp_live_" + "x" * 40, "cp_live_short"])
def test_a_wrong_key_is_401(project, make_key, key_client, raw):
    make_key(project)
    resp = key_client(raw).get("/api/v1/me")
    assert resp.status_code == 401
    assert resp.json()["error_code"] == "invalid_api_key"


def test_a_key_with_a_right_prefix_but_wrong_secret_is_401(project, make_key, key_client):
    _, raw = make_key(project)
    tampered = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    assert key_client(tampered).get("/api/v1/me").json()["error_code"] == "invalid_api_key"


def test_a_revoked_key_is_401(project, make_key, key_client, alice):
    key, raw = make_key(project)
    services.api_key_revoke(key=key, actor=alice)
    resp = key_client(raw).get("/api/v1/me")
    assert resp.status_code == 401
    assert resp.json()["error_code"] == "api_key_revoked"


def test_an_expired_key_is_401(project, make_key, key_client):
    key, raw = make_key(project, expires_at=timezone.now() + timedelta(hours=1))
    assert key_client(raw).get("/api/v1/me").status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    resp = key_client(raw).get("/api/v1/me")
    assert resp.status_code == 401
    assert resp.json()["error_code"] == "api_key_expired"


def test_a_key_without_the_read_scope_cannot_read_the_project(project, make_key, key_client):
    _, ingest_only = make_key(project, scopes=["ingest"])
    resp = key_client(ingest_only).get("/api/v1/projects/acme")
    assert resp.status_code == 403
    assert resp.json()["error_code"] == "missing_scope"
    _, reader = make_key(project, scopes=["read"])
    assert key_client(reader).get("/api/v1/projects/acme").status_code == 200


def test_unknown_or_empty_scopes_are_refused(project, client_for, alice):
    c = client_for(alice)
    for scopes in (["ingest", "admin"], []):
        resp = c.post("/api/v1/projects/acme/keys", {"name": "k", "scopes": scopes}, format="json")
        assert resp.status_code == 400
        assert resp.json()["error_code"] == "invalid_request"
        assert "scopes" in resp.json()["details"]["fields"]
    assert not ApiKey.objects.exists()


def test_an_admin_creates_a_key_over_the_api_and_sees_the_secret_once(project, client_for, alice, key_client):
    c = client_for(alice)
    resp = c.post("/api/v1/projects/acme/keys", {"name": "agent-1", "scopes": ["ingest", "read"]}, format="json")
    assert resp.status_code == 201
    raw = resp.json()["key"]
    assert key_client(raw).get("/api/v1/me").json()["project"] == "acme"
    listed = c.get("/api/v1/projects/acme/keys").json()
    assert [k["name"] for k in listed] == ["agent-1"]
    assert "key" not in listed[0] and raw not in str(listed)
    event = AuditEvent.objects.get(action="api_key.created")
    assert (event.actor_repr, event.actor_role, event.project_slug) == ("alice", "admin", "acme")
    assert raw not in str(event.after)


def test_an_admin_revokes_a_key_over_the_api_and_it_is_audited(project, client_for, alice, make_key, key_client):
    key, raw = make_key(project)
    resp = client_for(alice).post(f"/api/v1/projects/acme/keys/{key.pk}/revoke")
    assert resp.status_code == 200 and resp.json()["revoked"] is True
    assert key_client(raw).get("/api/v1/me").status_code == 401
    assert AuditEvent.objects.filter(action="api_key.revoked", object_id=str(key.pk)).count() == 1


def test_create_api_key_command_prints_only_the_key(db, capsys):
    call_command("create_api_key", "--project", "cli-proj", "--scopes", "ingest,read", "--create-project")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("cp_live_")
    key = ApiKey.objects.get()
    assert key.project.slug == "cli-proj" and key.scopes == ["ingest", "read"]


def test_create_api_key_command_refuses_unknown_scope_and_missing_project(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no project"):
        call_command("create_api_key", "--project", "nope", "--scopes", "read")
    with pytest.raises(CommandError, match="unknown scope"):
        call_command("create_api_key", "--project", "p2", "--scopes", "read,root", "--create-project")
    assert not ApiKey.objects.exists()
