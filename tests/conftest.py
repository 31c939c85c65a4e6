"""Shared fixtures: personas with one role each, a project, API clients and keys."""
from __future__ import annotations

import pytest
from django.db.backends.signals import connection_created
from rest_framework.test import APIClient

from apps.projects import services
from apps.projects.models import Role


def _allow_audit_truncate(sender, connection, **kwargs):
    # pytest-django flushes tables with TRUNCATE between transactional tests; the audit table's
    # TRUNCATE trigger permits it only for sessions that set this (only the test suite does).
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET controlplane.allow_audit_truncate = 'on'")


connection_created.connect(_allow_audit_truncate)


@pytest.fixture(autouse=True)
def _fast_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Per-process caches of database rows (budgets, prices, keys at the gateway) start empty: a test's
    rows are rolled back, and the next test's may reuse their ids."""
    from apps.common.ttl import forget_all

    forget_all()


@pytest.fixture(autouse=True)
def _fresh_backlog():
    """The inbox's backlog count lives in the shared cache; every test starts and ends with none (the
    next check reads the test's own inbox)."""
    from apps.traces import admission

    admission.backlog.reset()
    yield
    admission.backlog.reset()


@pytest.fixture(autouse=True)
def anchor_file(settings, tmp_path):
    """Each test anchors the audit chain into its own file: never into DATA_DIR, where `make run` keeps
    real anchors that would not match the test database."""
    settings.AUDIT_ANCHOR_FILE = tmp_path / "audit-anchors.jsonl"
    settings.AUDIT_ANCHOR_WEBHOOK_URL = ""
    return settings.AUDIT_ANCHOR_FILE


@pytest.fixture
def alice(django_user_model):
    """Project admin of `project`."""
    return django_user_model.objects.create_user("alice", password="pw-alice")


@pytest.fixture
def bob(django_user_model):
    """Auditor of `project`: reads everything, changes nothing."""
    return django_user_model.objects.create_user("bob", password="pw-bob")


@pytest.fixture
def charlie(django_user_model):
    """Outsider: holds no role in `project`."""
    return django_user_model.objects.create_user("charlie", password="pw-charlie")


@pytest.fixture
def project(alice, bob):
    p = services.project_create(slug="acme", name="Acme", actor=alice)  # alice becomes admin
    services.role_grant(project=p, user=bob, role=Role.AUDITOR, actor=alice)
    return p


@pytest.fixture
def other_project():
    return services.project_create(slug="globex", name="Globex", actor=None)


@pytest.fixture
def api_client():
    return APIClient()


@pytest.fixture
def client_for():
    """An APIClient logged in as a person."""

    def make(user) -> APIClient:
        c = APIClient()
        c.force_login(user)
        return c

    return make


@pytest.fixture
def make_key():
    """Mint a key; returns (ApiKey, raw secret)."""

    def make(project, scopes=("ingest", "read"), **kw):
        return services.api_key_create(project=project, name=kw.pop("name", "test"), scopes=list(scopes),
                                       actor=None, **kw)

    return make


@pytest.fixture
def key_client():
    def make(raw: str, header: str = "bearer") -> APIClient:
        c = APIClient()
        if header == "bearer":
            c.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        else:
            c.credentials(HTTP_X_API_KEY=raw)
        return c

    return make


_SQLITE_AUDIT_DELETE_TRIGGER = """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit_auditevent
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused on audit_auditevent'); END;"""


@pytest.fixture(autouse=True)
def _sqlite_flushable_audit(request):
    """On SQLite, a transactional test's teardown flushes tables with DELETE, which the audit log's
    trigger refuses (PostgreSQL's TRUNCATE has its own switch above). Lift the trigger for the flush
    only: it is restored before the next test starts."""
    marker = request.node.get_closest_marker("django_db")
    if marker is None or not marker.kwargs.get("transaction"):
        yield
        return
    request.getfixturevalue("transactional_db")
    from django.db import connection

    if connection.vendor != "sqlite":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute(_SQLITE_AUDIT_DELETE_TRIGGER)
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS audit_no_delete")
