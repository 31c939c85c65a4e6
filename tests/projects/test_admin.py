"""The admin as an audit console: keys shown once and revoked by an audited action; audit rows read-only."""
import re

import pytest

from apps.audit.models import AuditEvent
from apps.projects.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(django_user_model):
    """Superuser running the admin."""
    return django_user_model.objects.create_superuser("root", password="pw-root")


@pytest.fixture
def admin_client(client, root):
    client.force_login(root)
    return client


def test_creating_a_key_in_the_admin_shows_the_secret_once(project, admin_client, key_client):
    resp = admin_client.post("/admin/projects/apikey/add/",
                             {"project": project.pk, "name": "from-admin", "scopes": '["ingest"]',
                              "expires_at_0": "", "expires_at_1": ""}, follow=True)
    assert resp.status_code == 200
    raw = re.search(r"cp_live_[A-Za-z0-9]{40}", resp.content.decode()).group(0)
    assert key_client(raw).get("/api/v1/me").json()["scopes"] == ["ingest"]
    assert raw not in admin_client.get("/admin/projects/apikey/").content.decode()
    assert AuditEvent.objects.filter(action="api_key.created", actor_repr="root").count() == 1


def test_revoking_from_the_admin_is_audited(project, admin_client, make_key):
    key, _ = make_key(project)
    resp = admin_client.post("/admin/projects/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]},
                             follow=True)
    assert resp.status_code == 200
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.get(action="api_key.revoked").actor_repr == "root"


def test_audit_rows_are_read_only_in_the_admin(project, admin_client):
    event = AuditEvent.objects.first()
    listing = admin_client.get("/admin/audit/auditevent/?action=api_key.created&q=alice")
    assert listing.status_code == 200
    assert admin_client.get("/admin/audit/auditevent/add/").status_code == 403
    change = admin_client.post(f"/admin/audit/auditevent/{event.pk}/change/", {"actor_repr": "mallory"})
    assert change.status_code in (200, 403)
    assert admin_client.post(f"/admin/audit/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    event.refresh_from_db()
    assert event.actor_repr != "mallory"
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_staff_auditor_sees_only_their_projects_rows(project, other_project, client, bob, make_key):
    from django.contrib.auth.models import Permission

    make_key(other_project, name="secret-elsewhere")
    make_key(project, name="visible-here")
    bob.is_staff = True
    bob.save()
    bob.user_permissions.add(*Permission.objects.filter(codename__in=["view_apikey", "view_auditevent"]))
    client.force_login(bob)
    keys = client.get("/admin/projects/apikey/").content.decode()
    assert "visible-here" in keys and "secret-elsewhere" not in keys and "globex" not in keys
    audit = client.get("/admin/audit/auditevent/").content.decode()
    assert "globex" not in audit and "acme" in audit
    assert ApiKey.objects.count() == 2


def test_the_schema_documents_the_error_envelope(client):
    resp = client.get("/api/schema/")
    text = resp.content.decode()
    assert resp.status_code == 200
    for code in ("invalid_api_key", "api_key_revoked", "missing_scope", "person_only", "service_unavailable"):
        assert code in text
    assert client.get("/api/docs/").status_code == 200


def test_unknown_api_paths_answer_with_the_envelope(client):
    resp = client.get("/api/v1/nope")
    assert resp.status_code == 404 and resp.json()["error_code"] == "not_found"


def _staff_with(user, client, *codenames):
    from django.contrib.auth.models import Permission

    user.is_staff = True
    user.save()
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return client


def test_staff_mint_keys_only_in_projects_whose_keys_they_manage(project, other_project, client, alice, bob):
    c = _staff_with(alice, client, "add_apikey", "view_apikey", "change_apikey")
    form = c.get("/admin/projects/apikey/add/").content.decode()
    assert ">acme<" in form and "globex" not in form  # the project choices are alice's
    resp = c.post("/admin/projects/apikey/add/", {"project": other_project.pk, "name": "sneaky",
                                                  "scopes": '["ingest"]', "expires_at_0": "", "expires_at_1": ""})
    assert resp.status_code == 200 and "Select a valid choice" in resp.content.decode()
    assert not ApiKey.objects.filter(name="sneaky").exists()

    # An auditor holding Django's add/change permission still manages no project's keys.
    auditor = _staff_with(bob, client, "add_apikey", "view_apikey", "change_apikey")
    assert ">acme<" not in auditor.get("/admin/projects/apikey/add/").content.decode()
    key = ApiKey.objects.create(project=project, name="kept", lookup="x" * 12, key_hash="h", scopes=["read"])
    auditor.post("/admin/projects/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is None


def test_role_groups_are_for_superusers_only(project, other_project, client, alice):
    """Group names tell every project's slug: staff holding Django's group permissions still see none."""
    c = _staff_with(alice, client, "view_group", "change_group")
    assert c.get("/admin/auth/group/").status_code == 403
    assert "globex" not in c.get("/admin/").content.decode()


def test_role_checks_in_the_admin_ask_no_query_per_row(project, other_project, alice, rf,
                                                       django_assert_num_queries):
    """An action over a page of keys asks whether the viewer manages each key's project: after the
    first answer (which prefetches the viewer's projects and permissions), none costs a query."""
    from django.contrib import admin as django_admin

    from apps.projects.admin import ApiKeyAdmin

    model_admin = ApiKeyAdmin(ApiKey, django_admin.site)
    request = rf.get("/admin/projects/apikey/")
    request.user = alice
    assert model_admin.holds_perm(request, "manage_project", project.pk)
    with django_assert_num_queries(0):
        for _ in range(50):
            assert model_admin.holds_perm(request, "manage_project", project.pk)
            assert not model_admin.holds_perm(request, "manage_project", other_project.pk)
            assert model_admin.holds_perm(request, "manage_project")
