"""insert_rows: COPY on PostgreSQL, bulk_create elsewhere; the same rows either way."""
from __future__ import annotations

import pytest
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
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("bulk_create refuses it in its own words")
    run = Run.objects.create(project=project, run_id="r1", trace_id="t" * 32, started_at=timezone.now())
    with pytest.raises(ValueError, match="'run'"):
        insert_rows(Span, [{"project_id": project.pk, "run": run, "trace_id": "t", "span_id": "a", "name": "x",
                            "start_time": timezone.now()}])
    assert not Span.objects.exists()
