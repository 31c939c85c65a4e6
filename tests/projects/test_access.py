"""Who may see and do what: outsiders get 404, auditors read only, keys never act as people."""
import pytest

from apps.audit.models import AuditEvent
from apps.projects.models import ApiKey

pytestmark = pytest.mark.django_db

PROJECT_URLS = [
    "/api/v1/projects/acme",
    "/api/v1/projects/acme/members",
    "/api/v1/projects/acme/keys",
]


@pytest.mark.parametrize("url", PROJECT_URLS)
def test_an_outsider_gets_404(project, client_for, charlie, url):
    resp = client_for(charlie).get(url)
    assert resp.status_code == 404
    assert resp.json()["error_code"] == "not_found"


@pytest.mark.parametrize("url", PROJECT_URLS)
def test_anonymous_gets_401(project, api_client, url):
    assert api_client.get(url).status_code == 401


def test_an_outsider_cannot_create_or_revoke_keys(project, client_for, charlie, make_key):
    key, _ = make_key(project)
    c = client_for(charlie)
    assert c.post("/api/v1/projects/acme/keys", {"name": "x", "scopes": ["read"]}, format="json").status_code == 404
    assert c.post(f"/api/v1/projects/acme/keys/{key.pk}/revoke").status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def test_another_projects_key_gets_404(project, other_project, make_key, key_client):
    _, raw = make_key(other_project, scopes=["read"])
    resp = key_client(raw).get("/api/v1/projects/acme")
    assert resp.status_code == 404
    assert [p["slug"] for p in key_client(raw).get("/api/v1/projects").json()] == ["globex"]


def test_project_list_shows_only_a_persons_projects(project, other_project, client_for, bob, charlie):
    assert [p["slug"] for p in client_for(bob).get("/api/v1/projects").json()] == ["acme"]
    assert client_for(charlie).get("/api/v1/projects").json() == []


def test_an_auditor_reads_but_cannot_change(project, client_for, bob, make_key):
    key, _ = make_key(project)
    c = client_for(bob)
    assert c.get("/api/v1/projects/acme/keys").status_code == 200
    assert c.get("/api/v1/projects/acme/members").status_code == 200
    resp = c.post("/api/v1/projects/acme/keys", {"name": "x", "scopes": ["read"]}, format="json")
    assert resp.status_code == 403 and resp.json()["error_code"] == "permission_denied"
    assert c.post(f"/api/v1/projects/acme/keys/{key.pk}/revoke").status_code == 403
    assert c.post("/api/v1/projects/acme/members", {"username": "bob", "role": "admin"},
                  format="json").status_code == 403
    assert ApiKey.objects.count() == 1


ALL_SCOPES = ["ingest", "read", "budget", "approvals", "queue"]


def test_an_agent_key_cannot_act_as_a_person(project, make_key, key_client, charlie):
    key, raw = make_key(project, scopes=ALL_SCOPES)
    c = key_client(raw)
    attempts = [
        c.post("/api/v1/projects/acme/keys", {"name": "x", "scopes": ["read"]}, format="json"),
        c.get("/api/v1/projects/acme/keys"),
        c.post(f"/api/v1/projects/acme/keys/{key.pk}/revoke"),
        c.get("/api/v1/projects/acme/members"),
        c.post("/api/v1/projects/acme/members", {"username": "charlie", "role": "approver"}, format="json"),
        c.delete("/api/v1/projects/acme/members/alice/admin"),
        c.post("/api/v1/projects", {"slug": "evil"}, format="json"),
    ]
    for resp in attempts:
        assert resp.status_code == 403, resp.content
        assert resp.json()["error_code"] == "person_only"
    assert ApiKey.objects.count() == 1
    assert not AuditEvent.objects.filter(actor_type="api_key").exists()


def test_an_admin_grants_and_removes_roles_and_both_are_audited(project, client_for, alice, charlie):
    c = client_for(alice)
    resp = c.post("/api/v1/projects/acme/members", {"username": "charlie", "role": "approver"}, format="json")
    assert resp.status_code == 201 and resp.json()["roles"] == ["approver"]
    assert client_for(charlie).get("/api/v1/projects/acme").status_code == 200
    assert c.delete("/api/v1/projects/acme/members/charlie/approver").status_code == 204
    assert client_for(charlie).get("/api/v1/projects/acme").status_code == 404
    actions = list(AuditEvent.objects.filter(object_type="projects.projectrole").order_by("seq")
                   .values_list("action", "actor_repr"))
    assert actions[-2:] == [("role.granted", "alice"), ("role.revoked", "alice")]


def test_me_for_a_person_lists_projects_and_roles(project, client_for, alice, bob):
    body = client_for(alice).get("/api/v1/me").json()
    assert body["type"] == "user" and body["username"] == "alice"
    assert body["projects"] == [{"slug": "acme", "name": "Acme", "roles": ["admin"]}]
    assert client_for(bob).get("/api/v1/me").json()["projects"][0]["roles"] == ["auditor"]


def test_role_permissions_are_guardian_object_permissions(project, alice, bob, charlie):
    assert alice.has_perm("projects.manage_project", project)
    assert bob.has_perm("projects.view_project", project)
    assert not bob.has_perm("projects.manage_project", project)
    assert not charlie.has_perm("projects.view_project", project)


def test_an_outsider_cannot_grant_or_remove_roles(project, client_for, charlie):
    c = client_for(charlie)
    resp = c.post("/api/v1/projects/acme/members", {"username": "charlie", "role": "admin"}, format="json")
    assert resp.status_code == 404
    assert c.delete("/api/v1/projects/acme/members/alice/admin").status_code == 404
    assert not charlie.has_perm("projects.view_project", project)


def test_only_people_allowed_to_may_create_projects(db, client_for, charlie, django_user_model):
    resp = client_for(charlie).post("/api/v1/projects", {"slug": "mine"}, format="json")
    assert resp.status_code == 403 and resp.json()["error_code"] == "permission_denied"
    root = django_user_model.objects.create_superuser("root", password="pw")
    resp = client_for(root).post("/api/v1/projects", {"slug": "mine", "name": "Mine"}, format="json")
    assert resp.status_code == 201 and resp.json()["slug"] == "mine"
    assert AuditEvent.objects.filter(action="project.created", project_slug="mine", actor_repr="root").exists()
    assert AuditEvent.objects.filter(action="role.granted", project_slug="mine").exists()


def _project_owned_models():
    from django.apps import apps

    from apps.projects.models import Project

    return [m for m in apps.get_models() if m is Project or any(
        f.many_to_one and f.related_model is Project for f in m._meta.fields)]


def test_every_project_owned_model_has_visible_to():
    """A model with a foreign key to Project gets ``visible_to`` by using ProjectOwnedQuerySet."""
    from apps.projects.models import ProjectOwnedQuerySet

    owned = _project_owned_models()
    assert {m._meta.label for m in owned} >= {"projects.Project", "projects.ApiKey", "projects.ProjectRole",
                                              "traces.Run", "traces.Span", "traces.ToolCall",
                                              "traces.IngestBatch", "traces.DeadRecord"}
    without = [m._meta.label for m in owned if not isinstance(m._default_manager.all(), ProjectOwnedQuerySet)]
    assert not without, f"project-owned models without ProjectOwnedQuerySet: {without}"


def test_project_access_answers_projects_and_roles_for_every_kind_of_principal(
        project, other_project, alice, bob, charlie, make_key, django_user_model):
    from django.contrib.auth.models import AnonymousUser

    from apps.projects.access import project_access
    from apps.projects.models import Project, ProjectRole

    key, _ = make_key(other_project)
    make_key(project)
    root = django_user_model.objects.create_superuser("root", password="pw")
    assert project_access(bob).roles == {project.pk: frozenset({"auditor"})}
    assert project_access(key).roles == {other_project.pk: frozenset()}  # its project, no person's role
    assert not project_access(charlie).roles and not project_access(AnonymousUser()).roles
    assert project_access(None).roles == {} and not project_access(root).roles and project_access(root).everything

    for model in (Project, ApiKey, ProjectRole):
        field = "pk" if model is Project else "project_id"
        seen = {who: set(model.objects.visible_to(who).values_list(field, flat=True))
                for who in (bob, key, charlie, None, root)}
        assert seen == {bob: {project.pk}, key: {other_project.pk}, charlie: set(), None: set(),
                        root: {project.pk, other_project.pk}}, model
    assert list(Project.objects.visible_to(bob, project_slug="globex")) == []
    assert list(Project.objects.visible_to(root, project_slug="globex")) == [other_project]
    assert list(Project.objects.visible_to(key, project_slug="acme")) == []
