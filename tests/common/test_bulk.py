"""insert_rows: COPY on PostgreSQL, bulk_create elsewhere; the same rows either way."""
from __future__ import annotations

import pytest
from django.db import transaction
from django.utils import timezone

from apps.common.bulk import insert_rows
from apps.traces.models import Run, Span

pytestmark = pytest.mark.django_db


def test_rows_are_stored_as_a_save_would_store_them_and_their_keys_come_back_in_order(project):
    now = timezone.now()
    run = Run.objects.create(project=project, run_id="r1", trace_id="t" * 32, started_at=now)
    before = timezone.now()
    rows = [
        {"project_id": project.pk, "run_id": run.pk, "trace_id": "t" * 32, "span_id": "a", "name": "chat",
         "kind": "llm", "start_time": now, "input_messages": [{"role": "user", "content": "tab\tnew\nline \\ 'q' \"d\""}],
         "attributes": {"n": 1, "nested": {"x": [1, 2.5, None, True]}}, "input_tokens": 12},
        # Missing keys take the field's default; None in a JSON column is SQL NULL.
        {"project_id": project.pk, "run_id": run.pk, "trace_id": "t" * 32, "span_id": "b", "name": "tool",
         "start_time": now, "details": None},
    ]
    pks = insert_rows(Span, rows)
    assert len(pks) == 2 and pks[0] < pks[1]
    a, b = Span.objects.get(pk=pks[0]), Span.objects.get(pk=pks[1])
    assert (a.span_id, b.span_id) == ("a", "b")
    assert a.input_messages == [{"role": "user", "content": "tab\tnew\nline \\ 'q' \"d\""}]
    assert a.attributes == {"n": 1, "nested": {"x": [1, 2.5, None, True]}} and a.input_tokens == 12
    assert (b.kind, b.status, b.parent_span_id, b.attributes, b.events, b.input_tokens) == (
        "other", "unset", "", {}, [], None)
    assert Span.objects.filter(pk=b.pk, details__isnull=True).exists()
    assert a.start_time == now and a.received_at >= before  # auto_now_add is filled in
    assert insert_rows(Span, []) == []
    # The sequence moved past the keys drawn: an ordinary insert after it does not collide.
    c = Span.objects.create(project=project, run=run, trace_id="t" * 32, span_id="c", name="x", start_time=now)
    assert c.pk > pks[1]


def test_large_values_are_stored_without_pglz_on_postgresql(project):
    """Migration traces 0006: inbox payloads out of line uncompressed, content JSON with lz4."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL storage settings")
    with connection.cursor() as cursor:
        cursor.execute("""SELECT attrelid::regclass::text, attname, attstorage, attcompression FROM pg_attribute
                          WHERE (attrelid, attname) IN (('traces_ingestbatch'::regclass, 'raw'),
                                                        ('traces_span'::regclass, 'input_messages'),
                                                        ('traces_toolcall'::regclass, 'result'))""")
        rows = {(table, column): (storage, compression) for table, column, storage, compression in cursor.fetchall()}
    assert rows[("traces_ingestbatch", "raw")][0] == "e"
    assert rows[("traces_span", "input_messages")][1] == "l"
    assert rows[("traces_toolcall", "result")][1] == "l"


def test_a_row_naming_no_column_is_refused_before_anything_is_written(project):
    run = Run.objects.create(project=project, run_id="r1", trace_id="t" * 32, started_at=timezone.now())
    with pytest.raises(ValueError, match="'run'"):
        insert_rows(Span, [{"project_id": project.pk, "run": run, "trace_id": "t", "span_id": "a", "name": "x",
                            "start_time": timezone.now()}])
    assert not Span.objects.exists()


def test_rows_already_held_by_a_unique_constraint_are_skipped_and_the_rest_inserted(project):
    from apps.common.bulk import insert_rows_ignoring_conflicts

    now = timezone.now()
    Run.objects.create(project=project, run_id="taken", trace_id="a" * 32, started_at=now, end_user="first")
    insert_rows_ignoring_conflicts(Run, [
        {"project_id": project.pk, "run_id": "taken", "trace_id": "b" * 32, "started_at": now, "end_user": "second"},
        {"project_id": project.pk, "run_id": "new", "trace_id": "c" * 32, "started_at": now, "status": "running"},
    ])
    assert Run.objects.get(run_id="taken").end_user == "first"
    new = Run.objects.get(run_id="new")
    assert (new.trace_id, new.status, new.metadata, new.models_used, new.span_count) == ("c" * 32, "running", {}, [], 0)
    assert new.created_at is not None
    insert_rows_ignoring_conflicts(Run, [])  # nothing to do
    with pytest.raises(ValueError, match="'nope'"):
        insert_rows_ignoring_conflicts(Run, [{"project_id": project.pk, "nope": 1}])


def test_objects_are_updated_field_by_field_with_their_types_kept(project):
    from decimal import Decimal

    from django.db import DataError

    from apps.common.bulk import update_objects

    now = timezone.now()
    runs = [Run.objects.create(project=project, run_id=f"r{i}", trace_id=f"{i}" * 32, started_at=now) for i in range(3)]
    runs[0].metadata, runs[0].input_tokens, runs[0].ended_at = {"k": ["v", 1, None]}, 12, now
    runs[1].output, runs[1].cost_usd, runs[1].derive_status, runs[1].duration_ms = None, Decimal("0.12345678"), True, 1.5
    runs[2].agent_name, runs[2].parent_run = "agent 'quoted' \\ \t", runs[0]
    update_objects(Run, list(reversed(runs)), ["metadata", "input_tokens", "ended_at", "output", "cost_usd",
                                               "derive_status", "duration_ms", "agent_name", "parent_run"])
    a, b, c = (Run.objects.get(pk=r.pk) for r in runs)
    assert (a.metadata, a.input_tokens, a.ended_at) == ({"k": ["v", 1, None]}, 12, now)
    assert (b.output, b.cost_usd, b.derive_status, b.duration_ms) == (None, Decimal("0.12345678"), True, 1.5)
    assert (c.agent_name, c.parent_run_id) == ("agent 'quoted' \\ \t", a.pk)
    assert (a.agent_name, b.metadata, c.input_tokens) == ("", {}, 0)  # fields not named stay as they were
    from django.db import connection

    if connection.vendor == "postgresql":  # SQLite keeps any length
        runs[0].agent_name = "x" * 201  # max_length 200: refused, never cut
        with pytest.raises(DataError), transaction.atomic():
            update_objects(Run, [runs[0]], ["agent_name"])


def test_any_of_matches_members_and_nothing_for_an_empty_list(project):
    now = timezone.now()
    for i in range(3):
        Run.objects.create(project=project, run_id=f"r{i}", trace_id=f"{i}" * 32, started_at=now)
    assert sorted(Run.objects.filter(run_id__any_of=["r0", "r2", "zz", "r0"]).values_list("run_id", flat=True)) == [
        "r0", "r2"]
    assert sorted(Run.objects.filter(run_id__any_of={"r1"}).values_list("run_id", flat=True)) == ["r1"]
    assert not Run.objects.filter(run_id__any_of=[]).exists()
    assert Run.objects.exclude(run_id__any_of=["r1"]).count() == 2


def test_rows_that_carry_their_own_primary_key_are_inserted_with_it(project):
    """A span cost is keyed by its span's row id: given like any column, never drawn from a sequence."""
    from apps.budgets.models import SpanCost

    run = Run.objects.create(project=project, run_id="r1", trace_id="t" * 32, started_at=timezone.now())
    row = {"project_id": project.pk, "run_id": run.pk, "span_id": "a", "day": timezone.now().date(), "hour": 3,
           "source": "computed", "cost_nanos": 12}
    with pytest.raises(ValueError, match="own keys"):
        insert_rows(SpanCost, [{**row, "span_pk": 41}])
    assert insert_rows(SpanCost, [{**row, "span_pk": 41}, {**row, "span_pk": 7, "cost_nanos": None}], ids=False) == []
    assert dict(SpanCost.objects.values_list("span_pk", "cost_nanos")) == {41: 12, 7: None}


@pytest.mark.django_db(transaction=True)
def test_outside_any_transaction_the_rows_are_written_all_the_same(project):
    """The stage empties itself at each commit: in autocommit, each call is its own transaction (it was
    none, and the COPY's rows were gone before the INSERT or UPDATE read them: nothing written)."""
    from apps.common.bulk import insert_rows_ignoring_conflicts, update_objects

    now = timezone.now()
    assert transaction.get_autocommit()
    insert_rows_ignoring_conflicts(Run, [{"project_id": project.pk, "run_id": "a", "trace_id": "a" * 32,
                                          "started_at": now}])
    run = Run.objects.get(run_id="a")
    run.agent_name = "written"
    update_objects(Run, [run], ["agent_name"])
    assert Run.objects.get(run_id="a").agent_name == "written"
