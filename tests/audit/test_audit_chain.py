"""The audit log: written in the change's transaction, hash-chained, append-only in the database."""
import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction

from apps.audit.models import GENESIS_HASH, AuditEvent
from apps.audit.selectors import audit_chain_verify
from apps.projects import services
from apps.projects.models import ApiKey, Project
from tests.audit.tampering import bypass_triggers

pytestmark = pytest.mark.django_db


class _Rollback(Exception):
    pass


def test_a_change_writes_one_row_with_actor_role_and_request_id(project, client_for, alice):
    resp = client_for(alice).post("/api/v1/projects/acme/keys", {"name": "k", "scopes": ["read"]},
                                  format="json", HTTP_X_REQUEST_ID="req-123")
    assert resp.status_code == 201 and resp["X-Request-ID"] == "req-123"
    event = AuditEvent.objects.get(action="api_key.created")
    assert event.actor_type == "user" and event.actor_repr == "alice" and event.actor_role == "admin"
    assert event.object_type == "projects.apikey" and event.object_id == str(resp.json()["id"])
    assert event.after["scopes"] == ["read"] and event.request_id == "req-123"


def test_a_change_that_rolls_back_leaves_no_audit_row(project):
    before = AuditEvent.objects.count()
    with pytest.raises(_Rollback), transaction.atomic():
        services.api_key_create(project=project, name="doomed", scopes=["read"], actor=None)
        assert AuditEvent.objects.count() == before + 1  # written, inside the transaction...
        raise _Rollback  # ...and the change fails afterwards
    assert AuditEvent.objects.count() == before
    assert not ApiKey.objects.filter(name="doomed").exists()


def test_a_refused_change_leaves_no_audit_row(project):
    from django.core.exceptions import ValidationError

    before = AuditEvent.objects.count()
    with pytest.raises(ValidationError):
        services.api_key_create(project=project, name="bad", scopes=["root"], actor=None)
    assert AuditEvent.objects.count() == before


def test_the_chain_links_each_row_to_the_previous_one(project):
    rows = list(AuditEvent.objects.order_by("seq"))
    assert len(rows) >= 3
    assert rows[0].seq == 1 and rows[0].prev_hash == GENESIS_HASH
    for prev, row in zip(rows, rows[1:], strict=False):
        assert row.seq == prev.seq + 1 and row.prev_hash == prev.hash
        assert row.hash == row.compute_hash()
    call_command("audit_verify")


def test_audit_verify_detects_an_edited_row(project, capsys):
    call_command("audit_verify")
    assert "audit chain OK" in capsys.readouterr().out
    target = AuditEvent.objects.order_by("seq")[1]
    bypass_triggers()
    AuditEvent.objects.filter(pk=target.pk).update(actor_repr="mallory")
    with pytest.raises(CommandError, match=f"row #{target.seq} .*edited"):
        call_command("audit_verify")


def test_audit_verify_detects_a_deleted_row(project):
    target = AuditEvent.objects.order_by("seq")[1]
    bypass_triggers()
    AuditEvent.objects.filter(pk=target.pk).delete()
    with pytest.raises(CommandError, match=f"row #{target.seq + 1} .*sequence gap"):
        call_command("audit_verify")


def test_audit_verify_detects_a_forged_row_with_a_recomputed_hash(project):
    """Recomputing the edited row's own hash does not help: the next row still points at the old one."""
    target = AuditEvent.objects.order_by("seq")[0]
    target.actor_repr = "mallory"
    forged_hash = target.compute_hash()
    bypass_triggers()
    AuditEvent.objects.filter(pk=target.pk).update(actor_repr="mallory", hash=forged_hash)
    breaks = list(audit_chain_verify())
    assert [b.seq for b in breaks] == [target.seq + 1]


@pytest.mark.parametrize("statement", [
    "UPDATE audit_auditevent SET actor_repr = 'mallory'",
    "DELETE FROM audit_auditevent",
])
def test_the_database_refuses_update_and_delete(project, statement):
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as c:
        c.execute(statement)
    assert not AuditEvent.objects.filter(actor_repr="mallory").exists()
    assert AuditEvent.objects.count() >= 3


def test_postgresql_refuses_truncate(project):
    if connection.vendor != "postgresql":
        pytest.skip("TRUNCATE does not exist on SQLite")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as c:
        c.execute("SET LOCAL controlplane.allow_audit_truncate = 'off'")
        c.execute("TRUNCATE audit_auditevent")
    assert AuditEvent.objects.count() >= 3


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_audited_changes_leave_one_unbroken_chain():
    if connection.vendor != "postgresql":
        pytest.skip("concurrent writers need a server database (SQLite serialises the whole file)")
    project = services.project_create(slug="race", name="Race", actor=None)
    start = threading.Barrier(20)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            start.wait()
            services.api_key_create(project=Project.objects.get(pk=project.pk), name=f"k{i}",
                                    scopes=["read"], actor=None)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert ApiKey.objects.count() == 20
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert AuditEvent.objects.filter(action="api_key.created").count() == 20
    assert list(audit_chain_verify()) == []
