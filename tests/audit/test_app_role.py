"""The application's PostgreSQL role (`manage.py db_app_role`): it reads and writes everything, but only
appends to the audit log, and cannot switch the log's triggers off."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_chain_verify
from apps.audit.services import Actor, audit_record

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "app-role-test-pw"

pytestmark = pytest.mark.django_db(transaction=True)  # the role must be committed to be seen by its own session


@pytest.fixture
def app_role():
    """A fresh role name, dropped afterwards (roles belong to the whole server, not the test database)."""
    if connection.vendor != "postgresql":
        pytest.skip("database roles are PostgreSQL's")
    name = f"cp_test_app_{uuid.uuid4().hex[:10]}"
    yield name
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name])
        if cursor.fetchone():
            cursor.execute(f'DROP OWNED BY "{name}"')  # its grants, here and on the database
            cursor.execute(f'DROP ROLE "{name}"')


def _connect(role: str) -> psycopg.Connection:
    s = connection.settings_dict
    return psycopg.connect(host=s["HOST"] or "127.0.0.1", port=s["PORT"] or 5432, dbname=s["NAME"], user=role,
                           password=PASSWORD, autocommit=True)


def _audited_rows() -> None:
    for i in range(3):
        audit_record(actor=Actor.system("test"), action="test.event", object_type="test", object_id=i,
                     object_repr=f"thing {i}")


def _refused(conn: psycopg.Connection, statement: str, match: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=match):
        conn.execute(statement)


@pytest.mark.parametrize("statement", [
    "UPDATE audit_auditevent SET actor_repr = 'mallory'",
    "DELETE FROM audit_auditevent WHERE seq >= 2",
    "TRUNCATE audit_auditevent",
    # the switch the test suite's flush uses lets the owner TRUNCATE past the trigger; not this role
    "SET controlplane.allow_audit_truncate = 'on'; TRUNCATE audit_auditevent",
])
def test_the_app_role_cannot_change_or_remove_audit_rows(app_role, statement):
    _audited_rows()
    call_command("db_app_role", role=app_role, password=PASSWORD)
    with _connect(app_role) as conn:
        # The privilege check, not the trigger ("append-only"), refuses it: it holds with triggers off.
        *setup, last = statement.split("; ")
        for s in setup:
            conn.execute(s)
        _refused(conn, last, "permission denied for table audit_auditevent")
    assert AuditEvent.objects.count() == 3 and not AuditEvent.objects.filter(actor_repr="mallory").exists()
    assert list(audit_chain_verify()) == []


def test_the_app_role_cannot_switch_the_triggers_off_as_the_owner_can(app_role):
    call_command("db_app_role", role=app_role, password=PASSWORD)
    with connection.cursor() as cursor:  # the owner (here a superuser) can: the hole being closed
        cursor.execute("SET session_replication_role = replica")
        cursor.execute("RESET session_replication_role")
    with _connect(app_role) as conn:
        _refused(conn, "SET session_replication_role = replica",
                 'permission denied to set parameter "session_replication_role"')
        _refused(conn, "ALTER TABLE audit_auditevent DISABLE TRIGGER USER",
                 "must be owner of table audit_auditevent")
        _refused(conn, "DROP TRIGGER audit_no_update_delete ON audit_auditevent",
                 "must be owner of relation audit_auditevent")
        _refused(conn, "CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger AS $$ BEGIN RETURN NEW; END; "
                       "$$ LANGUAGE plpgsql",
                 # PostgreSQL 15+ gives nobody CREATE on public; before, the function's owner check refuses
                 "permission denied for schema public|must be owner of function audit_refuse_change")


def test_the_role_is_a_plain_login_role_that_owns_nothing(app_role):
    call_command("db_app_role", role=app_role, password=PASSWORD)
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                       "FROM pg_roles WHERE rolname = %s", [app_role])
        assert cursor.fetchone() == (True, False, False, False, False, False)
        privileges = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        cursor.execute("SELECT " + ", ".join(f"has_table_privilege(%s, 'audit_auditevent', '{p}')" for p in privileges),
                       [app_role] * len(privileges))
        assert dict(zip(privileges, cursor.fetchone(), strict=True)) == {
            "SELECT": True, "INSERT": True, "UPDATE": False, "DELETE": False, "TRUNCATE": False,
            "REFERENCES": False, "TRIGGER": False}


def test_the_app_role_appends_to_the_audit_log_and_reads_and_writes_other_tables(app_role):
    _audited_rows()
    call_command("db_app_role", role=app_role, password=PASSWORD)
    tip = AuditEvent.objects.order_by("-seq").first()
    row = AuditEvent(seq=tip.seq + 1, created_at=tip.created_at, actor_type="system", actor_repr="app role",
                     action="test.appended", object_type="test", object_id="x", object_repr="x", prev_hash=tip.hash)
    row.hash = row.compute_hash()
    with _connect(app_role) as conn:
        assert conn.execute("SELECT count(*) FROM audit_auditevent").fetchone() == (3,)
        conn.execute("INSERT INTO audit_auditevent (seq, created_at, project_slug, actor_type, actor_id, actor_repr, "
                     "actor_role, action, object_type, object_id, object_repr, request_id, prev_hash, hash) "
                     "VALUES (%s, %s, '', 'system', '', 'app role', '', 'test.appended', 'test', 'x', 'x', '', %s, %s)",
                     [row.seq, row.created_at, row.prev_hash, row.hash])
        group = conn.execute("INSERT INTO auth_group (name) VALUES ('app role') RETURNING id").fetchone()[0]
        conn.execute("UPDATE auth_group SET name = 'app role 2' WHERE id = %s", [group])
        conn.execute("DELETE FROM auth_group WHERE id = %s", [group])
    assert AuditEvent.objects.filter(action="test.appended").count() == 1
    assert list(audit_chain_verify()) == []


def test_the_application_runs_as_the_app_role(app_role, tmp_path):
    """The real code paths (audited writes, REST ingest, the projection's COPY through temporary tables,
    audit_verify) in a process connected as the app role."""
    call_command("db_app_role", role=app_role, password=PASSWORD)
    s = connection.settings_dict
    url = f"postgres://{app_role}:{PASSWORD}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    script = """
from django.core.management import call_command
from django.db import connection
from django.test import Client
from apps.projects import services
from apps.traces.services import inbox_drain
from apps.traces.models import Run
with connection.cursor() as cursor:
    cursor.execute("SELECT current_user")
    print("as", cursor.fetchone()[0])
project = services.project_create(slug="approle", name="App role", actor=None)
key, raw = services.api_key_create(project=project, name="k", scopes=["ingest", "read"], actor=None)
c = Client(SERVER_NAME="localhost", HTTP_AUTHORIZATION=f"Bearer {raw}")
r = c.post("/api/v1/runs", {"run_id": "r-1", "agent": {"name": "bot"}}, content_type="application/json")
assert r.status_code == 202, r.content
r = c.post("/api/v1/runs/r-1/spans", [{"span_id": "s-1", "kind": "llm", "model": "m"}], content_type="application/json")
assert r.status_code == 202, r.content
inbox_drain(budget_seconds=10)
print("spans", Run.objects.get(project=project, run_id="r-1").spans.count())
call_command("audit_verify")
"""
    env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(tmp_path / "var"), "DATABASE_POOL": "0"}
    proc = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"as {app_role}" in proc.stdout and "spans 1" in proc.stdout and "audit chain OK" in proc.stdout
    assert AuditEvent.objects.filter(action="api_key.created", project_slug="approle").exists()


def test_rerunning_the_command_takes_back_rights_granted_since_and_covers_new_tables(app_role):
    call_command("db_app_role", role=app_role, password=PASSWORD)
    with connection.cursor() as cursor:
        cursor.execute(f'GRANT UPDATE, DELETE, TRUNCATE ON audit_auditevent TO "{app_role}"')
        cursor.execute(f'ALTER ROLE "{app_role}" CREATEDB')
        # A table a later migration creates, as the owner.
        cursor.execute("CREATE TABLE audit_test_later (id bigint GENERATED BY DEFAULT AS IDENTITY, note text)")
    try:
        with _connect(app_role) as conn:
            conn.execute("INSERT INTO audit_test_later (note) VALUES ('default privileges')")
        call_command("db_app_role", role=app_role)  # no password: keeps the one it has
        with _connect(app_role) as conn:
            _refused(conn, "TRUNCATE audit_auditevent", "permission denied for table audit_auditevent")
            _refused(conn, "DELETE FROM audit_auditevent", "permission denied for table audit_auditevent")
            conn.execute("UPDATE audit_test_later SET note = 'still writable'")
            assert conn.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE audit_test_later")


def test_the_command_refuses_a_role_that_owns_the_tables(app_role):
    with pytest.raises(CommandError, match="must be a different one"):
        call_command("db_app_role", role=connection.settings_dict["USER"])
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{app_role}" LOGIN')
        cursor.execute('CREATE TABLE audit_test_owned (id int)')
        cursor.execute(f'ALTER TABLE audit_test_owned OWNER TO "{app_role}"')
    try:
        with pytest.raises(CommandError, match="must own nothing"):
            call_command("db_app_role", role=app_role)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE audit_test_owned")


def test_the_command_refuses_a_role_that_could_still_delete_audit_rows(app_role):
    """A grant it does not manage (here to PUBLIC) is reported, and the whole run rolls back."""
    with connection.cursor() as cursor:
        cursor.execute("GRANT DELETE ON audit_auditevent TO PUBLIC")
    try:
        with pytest.raises(CommandError, match="could still change audit_auditevent through: DELETE"):
            call_command("db_app_role", role=app_role)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [app_role])
            assert cursor.fetchone() is None
    finally:
        with connection.cursor() as cursor:
            cursor.execute("REVOKE DELETE ON audit_auditevent FROM PUBLIC")


@pytest.mark.django_db
def test_the_command_needs_postgresql():
    if connection.vendor == "postgresql":
        pytest.skip("covered above")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        call_command("db_app_role", role="controlplane_app")
