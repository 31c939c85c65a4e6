"""Bulk inserts for the write paths that carry volume (the run log's projection).

``insert_rows(model, rows)`` takes plain dicts ({attname: value}) rather than model instances:
building a 40-field instance per span (``Model.__init__`` and its signals) was a tenth of the
projection's CPU. On PostgreSQL the rows stream through ``COPY … FROM STDIN``, which psycopg formats
in C, where ``bulk_create`` builds one array per column for an ``INSERT … SELECT * FROM UNNEST(…)``
and quoting those arrays in Python was most of the projection's CPU (see bench/RESULTS.md). Primary
keys are drawn from the table's sequence first, in one query, and returned in row order. Elsewhere
(SQLite) it is ``bulk_create``.

A missing key takes the field's default (evaluated once per call); ``auto_now``/``auto_now_add``
take the current time; JSON goes through the connection's JSON adapter; other values go to psycopg
as they are (text, numbers, booleans, aware datetimes, foreign key ids), which adapts them as it
would any saved value. No signals are sent (``bulk_create`` sends none either).
"""
from __future__ import annotations

from operator import itemgetter

from django.db import connections, router
from django.db.models import DateField, JSONField, Model
from django.utils import timezone


def insert_rows(model: type[Model], rows: list[dict]) -> list[int]:
    """Insert ``rows`` and return their primary keys, in order."""
    if not rows:
        return []
    using = router.db_for_write(model)
    connection = connections[using]
    meta = model._meta
    if connection.vendor != "postgresql":
        objs = model.objects.using(using).bulk_create([model(**row) for row in rows], batch_size=1000)
        return [obj.pk for obj in objs]
    fields = [f for f in meta.concrete_fields if not f.generated and not f.primary_key]
    now = timezone.now()
    # Each row becomes {defaults, then the row, then the clock} read out in column order by one
    # itemgetter (all in C); only JSON values need a wrapper. Defaults are evaluated once per call.
    defaults = {f.attname: f.get_default() for f in fields}
    clock = {f.attname: now for f in fields if isinstance(f, DateField) and (f.auto_now or f.auto_now_add)}
    unknown = set().union(*rows) - defaults.keys()
    if unknown:
        raise ValueError(f"{meta.label} has no column {sorted(unknown)[0]!r}")
    getter = itemgetter(*(f.attname for f in fields))
    columns = getter if len(fields) > 1 else lambda row: (getter(row),)
    adapt = connection.ops.adapt_json_value
    json_columns = [(i, f.encoder) for i, f in enumerate(fields, start=1) if isinstance(f, JSONField)]
    names = ", ".join(connection.ops.quote_name(f.column) for f in [meta.pk, *fields])
    with connection.cursor() as cursor:
        cursor.execute("SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                       [meta.db_table, meta.pk.column, len(rows)])
        pks = [pk for (pk,) in cursor.fetchall()]
        with cursor.cursor.copy(f"COPY {connection.ops.quote_name(meta.db_table)} ({names}) FROM STDIN") as copy:
            for pk, row in zip(pks, rows, strict=True):
                values = [pk, *columns({**defaults, **row, **clock})]
                for i, encoder in json_columns:
                    if values[i] is not None:
                        values[i] = adapt(values[i], encoder)
                copy.write_row(values)
    return pks
