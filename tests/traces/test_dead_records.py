"""Defence in depth behind the door's validation: a batch the database refuses is split, not dropped.
The projection stores every record it can, sets aside the ones at fault as dead records (with their
reason, visible in the admin, counted on /healthz) and re-projects them once the cause is fixed."""
from __future__ import annotations

import json

import pytest

from apps.audit.models import AuditEvent
from apps.projects import services as project_services
from apps.projects.models import Role
from apps.traces import projection, records, services
from apps.traces.models import DeadRecord, IngestBatch, Run, Span

from .helpers import accept, at, drain, span, start

pytestmark = pytest.mark.django_db

GOOD = 50


def _good(run_id: str) -> list[dict]:
    return [start(run_id)] + [span(run_id, span_id=f"good-{i}", kind="llm", model="m", start_time=at(1),
                                   usage={"input_tokens": 10, "output_tokens": 1}) for i in range(GOOD)]


@pytest.fixture(autouse=True)
def _escaped_kind():
    """Batches stored as bytes (as OTLP's are) and decoded on the worker: what a decoder emits never
    passed through a JSON column, so it can hold what the store refuses (a decoder bug)."""
    services.register_decoder(ESCAPED, lambda payload, raw: json.loads(raw))
    yield
    projection.DECODERS.pop(ESCAPED, None)


ESCAPED = "test.escaped"


def accept_bytes(project, key, recs: list[dict]) -> dict:
    body, _ = services.batch_accept(project=project, api_key=key, source="otlp", kind=ESCAPED,
                                    raw=json.dumps(recs).encode(), item_count=len(recs), response={})
    return body


def _poison(run_id: str, span_id: str, **fields) -> dict:
    """A span record as a buggy producer might emit it, past the door's validation."""
    rec = span(run_id, span_id=span_id, kind="llm", start_time=at(2))
    rec["span"].update(fields)
    return rec


@pytest.mark.parametrize("fields", [
    {"usage": {"input_tokens": 2**63}},          # overflows bigint in the COPY
    {"name": "nul\x00name"},                     # PostgreSQL text refuses NUL
    {"attributes": {"score": float("inf")}},     # JSON columns refuse Infinity
    {"start_time": "yesterday"},                 # the projection cannot parse it
])
def test_one_unstorable_record_is_set_aside_and_every_good_record_beside_it_is_stored(project, make_key, fields):
    key = make_key(project)[0]
    good = _good("r1")
    recs = [*good[:20], _poison("r1", "bad", **fields), *good[20:]]
    body = accept_bytes(project, key, recs)
    drain()

    assert Span.objects.filter(run__run_id="r1").count() == GOOD
    run = Run.objects.get(run_id="r1")
    assert (run.span_count, run.input_tokens) == (GOOD, 10 * GOOD)
    batch = IngestBatch.objects.get()
    assert (batch.status, batch.error_code) == ("done", "records_dead")
    dead = DeadRecord.objects.get()
    assert (dead.position, dead.op, dead.run_ref, dead.status) == (20, "span", "r1", "dead")
    assert str(dead.batch_public_id) == body["batch_id"] and dead.error
    assert json.loads(bytes(dead.raw))["span"]["span_id"] == "bad"  # kept whole, escapes and all


def test_several_bad_records_are_each_isolated_in_order(project, make_key):
    key = make_key(project)[0]
    good = _good("r2")
    recs = [good[0], _poison("r2", "bad-a", name="a\x00"), *good[1:30], _poison("r2", "bad-b", name="b\x00"),
            *good[30:], _poison("r2", "bad-c", name="c\x00")]
    accept_bytes(project, key, recs)
    drain()
    assert Span.objects.filter(run__run_id="r2").count() == GOOD
    assert sorted(DeadRecord.objects.values_list("position", flat=True)) == [1, 31, GOOD + 3]


def test_an_undecodable_batch_is_still_dead_whole_and_can_be_put_back(project, make_key, root_actor):
    key = make_key(project)[0]
    accept(project, key, [{"op": "launch.rockets", "run_id": "x"}])
    drain()
    batch = IngestBatch.objects.get()
    assert (batch.status, batch.error_code) == ("dead", "invalid_record")
    assert services.dead_letter_counts() == {"batches": 1, "records": 0}
    assert services.batch_reproject(batch, actor=root_actor)
    batch.refresh_from_db()
    assert (batch.status, batch.attempts) == ("pending", 0)
    assert AuditEvent.objects.filter(action="traces.batch_reprojected").exists()


def test_a_record_failed_by_a_bug_is_stored_by_reprojection_once_the_bug_is_fixed(project, make_key, monkeypatch,
                                                                                root_actor):
    key = make_key(project)[0]
    real = records.redact

    def buggy(record, redactor):
        if record.get("op") == "span" and record["span"]["span_id"] == "tricky":
            raise RecursionError("maximum recursion depth exceeded")  # the bug
        return real(record, redactor)

    monkeypatch.setattr(records, "redact", buggy)
    accept(project, key, [*_good("r3"), span("r3", span_id="tricky", kind="tool", tool={"name": "mail"},
                                             attributes={"to": "jane@example.com"}, start_time=at(3))])
    drain()
    dead = DeadRecord.objects.get()
    assert dead.error_code == "unstorable_record" and "RecursionError" in dead.error
    assert "jane@example.com" not in dead.preview  # the preview is redacted (by the working path)
    assert not Span.objects.filter(span_id="tricky").exists()

    monkeypatch.setattr(records, "redact", real)  # the fix ships
    assert services.dead_record_reproject(dead, actor=root_actor)
    stored = Span.objects.get(span_id="tricky")
    assert stored.attributes == {"to": "[EMAIL]"}  # redacted on the way in, as any record
    dead.refresh_from_db()
    assert dead.status == "reprojected" and dead.reprojected_at is not None
    assert Run.objects.get(run_id="r3").span_count == GOOD + 1
    assert services.dead_letter_counts() == {"batches": 0, "records": 0}
    assert AuditEvent.objects.filter(action="traces.dead_record_reprojected").exists()
    assert not services.dead_record_reproject(dead, actor=root_actor)  # once only


def test_a_record_still_unstorable_stays_dead_with_its_new_reason(project, make_key, root_actor):
    key = make_key(project)[0]
    accept_bytes(project, key, [*_good("r4"), _poison("r4", "bad", name="x\x00")])
    drain()
    dead = DeadRecord.objects.get()
    assert not services.dead_record_reproject(dead, actor=root_actor)
    dead.refresh_from_db()
    assert dead.status == "dead" and dead.error
    assert Span.objects.filter(run__run_id="r4").count() == GOOD


def test_healthz_counts_dead_letters(client, project, make_key):
    key = make_key(project)[0]
    accept_bytes(project, key, [*_good("r5"), _poison("r5", "bad", name="x\x00")])
    accept(project, key, [{"op": "launch.rockets", "run_id": "x"}])
    drain()
    assert client.get("/healthz").json() == {"status": "ok", "dead_letters": {"batches": 1, "records": 1}}


def test_operators_reproject_from_the_admin_auditors_cannot(client, project, make_key, bob, django_user_model,
                                                            alice):
    key = make_key(project)[0]
    accept_bytes(project, key, [*_good("r6"), _poison("r6", "bad", name="x\x00")])
    drain()
    dead = DeadRecord.objects.get()
    dana = django_user_model.objects.create_user("dana", password="pw", is_staff=True)
    project_services.role_grant(project=project, user=dana, role=Role.OPERATOR, actor=alice)
    bob.is_staff = True
    bob.save()
    action = {"action": "reproject", "_selected_action": [dead.pk]}

    client.force_login(bob)  # auditor: sees it, cannot act
    listing = client.get("/admin/traces/deadrecord/").content.decode()
    assert dead.batch_public_id.hex[:8] in listing.replace("-", "") and 'value="reproject"' not in listing
    client.post("/admin/traces/deadrecord/", action)
    dead.refresh_from_db()
    assert "x\\u0000" in bytes(dead.raw).decode() and not AuditEvent.objects.filter(
        action="traces.dead_record_reprojected").exists()
    detail = client.get(f"/admin/traces/deadrecord/{dead.pk}/change/").content.decode()
    assert "unstorable_record" in detail or "invalid_record" in detail

    client.force_login(dana)  # operator: may re-project (it still fails: its reason stays)
    assert 'value="reproject"' in client.get("/admin/traces/deadrecord/").content.decode()
    r = client.post("/admin/traces/deadrecord/", action, follow=True)
    assert "still dead" in r.content.decode()


def test_outsiders_and_other_projects_operators_neither_see_nor_reproject_dead_records(
        client, project, other_project, make_key, charlie, django_user_model):
    accept_bytes(project, make_key(project)[0], [*_good("r7"), _poison("r7", "bad", name="x\x00")])
    drain()
    dead = DeadRecord.objects.get()
    charlie.is_staff = True  # staff with no role anywhere
    charlie.save()
    client.force_login(charlie)
    assert client.get("/admin/traces/deadrecord/").status_code == 403
    assert client.get(f"/admin/traces/deadrecord/{dead.pk}/change/").status_code in (302, 403, 404)

    erin = django_user_model.objects.create_user("erin", password="pw", is_staff=True)
    project_services.role_grant(project=other_project, user=erin, role=Role.OPERATOR, actor=None)
    client.force_login(erin)  # operator, but of globex: acme's record is not hers to see or act on
    listing = client.get("/admin/traces/deadrecord/")
    assert listing.status_code == 200 and str(dead.batch_public_id) not in listing.content.decode()
    client.post("/admin/traces/deadrecord/", {"action": "reproject", "_selected_action": [dead.pk]})
    assert not AuditEvent.objects.filter(action="traces.dead_record_reprojected").exists()
    assert client.get(f"/admin/traces/deadrecord/{dead.pk}/change/").status_code in (302, 404)


@pytest.fixture
def root_actor():
    from apps.audit.services import Actor
    return Actor.system("test")
