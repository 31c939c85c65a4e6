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

import hashlib
from operator import itemgetter

from django.db import connections, router, transaction
from django.db.models import DateField, JSONField, Model
from django.db.models.fields import AutoFieldMixin
from django.utils import timezone


class _Rows:
    """How one model's rows ({attname: value}) become parameter lists, in ``fields`` order."""

    def __init__(self, model: type[Model], connection, fields) -> None:
        now = timezone.now()
        self.fields = fields
        # Each row becomes {defaults, then the row, then the clock} read out in column order by one
        # itemgetter (all in C); only JSON values need a wrapper. Defaults are evaluated once per call.
        self.defaults = {f.attname: f.get_default() for f in fields}
        self.clock = {f.attname: now for f in fields if isinstance(f, DateField) and (f.auto_now or f.auto_now_add)}
        getter = itemgetter(*(f.attname for f in fields))
        self.columns = getter if len(fields) > 1 else lambda row: (getter(row),)
        self.adapt = connection.ops.adapt_json_value
        self.json = [(i, f.encoder) for i, f in enumerate(fields) if isinstance(f, JSONField)]
        self.label = model._meta.label

    def values(self, row: dict) -> list:
        values = list(self.columns({**self.defaults, **row, **self.clock}))
        for i, encoder in self.json:
            if values[i] is not None:
                values[i] = self.adapt(values[i], encoder)
        return values


def _writable(model: type[Model]) -> list:
    """The columns a row gives: all but generated ones and a numbered primary key (a key of the
    model's own, such as a span cost's span row id, is given like any column)."""
    return [f for f in model._meta.concrete_fields if not f.generated and not _numbered(f)]


def _numbered(field) -> bool:
    return isinstance(field, AutoFieldMixin)


def _check(model: type[Model], rows: list[dict]) -> None:
    unknown = set().union(*rows) - {f.attname for f in _writable(model)}
    if unknown:
        raise ValueError(f"{model._meta.label} has no column {sorted(unknown)[0]!r}")


def insert_rows(model: type[Model], rows: list[dict], *, ids: bool = True) -> list[int]:
    """Insert ``rows`` and return their primary keys, in order (``ids=False``: return nothing, and on
    PostgreSQL let the table's default number them, saving the query that draws them first; the only
    way for a model whose rows carry their own primary key)."""
    if not rows:
        return []
    if ids and not _numbered(model._meta.pk):
        raise ValueError(f"{model._meta.label}'s rows carry their own keys: insert them with ids=False")
    _check(model, rows)
    using = router.db_for_write(model)
    connection = connections[using]
    meta = model._meta
    if connection.vendor != "postgresql":
        objs = model.objects.using(using).bulk_create([model(**row) for row in rows], batch_size=1000)
        return [obj.pk for obj in objs] if ids else []
    fields = _writable(model)
    prepared = _Rows(model, connection, fields)
    if not ids:
        with connection.cursor() as cursor:
            _copy_into(cursor, connection.ops.quote_name(meta.db_table),
                       ", ".join(connection.ops.quote_name(f.column) for f in fields),
                       (prepared.values(row) for row in rows))
        return []
    names = ", ".join(connection.ops.quote_name(f.column) for f in [meta.pk, *fields])
    with connection.cursor() as cursor:
        cursor.execute("SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                       [meta.db_table, meta.pk.column, len(rows)])
        pks = [pk for (pk,) in cursor.fetchall()]
        _copy_into(cursor, connection.ops.quote_name(meta.db_table), names,
                   ([pk, *prepared.values(row)] for pk, row in zip(pks, rows, strict=True)))
    return pks


def _stage(cursor, connection, model: type[Model]) -> str:
    """A session temporary table shaped like ``model``'s (no constraints), empty, for COPY then one
    set-based statement. Named after the column list, so a migrated table gets a fresh one. Its rows
    last until the commit: use it inside a transaction."""
    meta = model._meta
    columns = ",".join(f"{f.column}:{f.db_type(connection)}" for f in meta.concrete_fields)
    name = connection.ops.quote_name(f"_stage_{meta.db_table}_{hashlib.sha1(columns.encode()).hexdigest()[:10]}")
    cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} ON COMMIT DELETE ROWS AS "
                   f"SELECT * FROM {connection.ops.quote_name(meta.db_table)} WITH NO DATA")
    return name


def _copy_into(cursor, table: str, columns: str, rows) -> None:
    """COPY rows in, errors raised as Django's (DataError, IntegrityError…), as from any query."""
    with cursor.db.wrap_database_errors, cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def insert_rows_ignoring_conflicts(model: type[Model], rows: list[dict]) -> int:
    """Insert ``rows``, skipping any that a unique constraint already holds (``ON CONFLICT DO NOTHING``);
    returns how many were inserted.

    On PostgreSQL: COPY into a temporary table, then one ``INSERT … SELECT … ON CONFLICT DO NOTHING``
    (``bulk_create`` with ``ignore_conflicts`` quotes one array per column in Python); elsewhere
    ``bulk_create``."""
    if not rows:
        return 0
    _check(model, rows)
    using = router.db_for_write(model)
    connection = connections[using]
    if connection.vendor != "postgresql":
        connection.ensure_connection()
        before = connection.connection.total_changes  # SQLite's count of rows written by this connection
        model.objects.using(using).bulk_create([model(**row) for row in rows], ignore_conflicts=True)
        return connection.connection.total_changes - before
    fields = _writable(model)
    prepared = _Rows(model, connection, fields)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    # One transaction (none of its own inside the caller's): the stage empties itself at each commit,
    # so in autocommit the COPY's rows would be gone before the INSERT read them.
    with transaction.atomic(using=using, savepoint=False), connection.cursor() as cursor:
        stage = _stage(cursor, connection, model)
        _copy_into(cursor, stage, columns, (prepared.values(row) for row in rows))
        cursor.execute(f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({columns}) "
                       f"SELECT {columns} FROM {stage} ON CONFLICT DO NOTHING")
        inserted = cursor.rowcount
        cursor.execute(f"DELETE FROM {stage}")
    return inserted


def update_objects(model: type[Model], objs: list[Model], field_names: list[str]) -> None:
    """Write ``field_names`` of each object (by primary key), as ``bulk_update`` would.

    On PostgreSQL: COPY the new values into a temporary table, then one ``UPDATE … FROM`` it
    (``bulk_update`` builds a CASE per field and row; an UPDATE per row was parsed once per row).
    Elsewhere one UPDATE per object in an executemany, in primary-key order. The caller holds the
    rows' locks (the projection takes them in primary-key order), so the order writes land in does
    not matter."""
    if not objs:
        return
    using = router.db_for_write(model)
    connection = connections[using]
    meta = model._meta
    fields = [meta.get_field(name) for name in field_names]
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    pk = quote(meta.pk.column)
    if connection.vendor != "postgresql":
        sql = f"UPDATE {table} SET " + ", ".join(f"{quote(f.column)} = %s" for f in fields) + f" WHERE {pk} = %s"
        rows = [[f.get_db_prep_save(getattr(o, f.attname), connection) for f in fields] + [o.pk]
                for o in sorted(objs, key=lambda o: o.pk)]
        with connection.cursor() as cursor:
            cursor.executemany(sql, rows)
        return
    prepared = _Rows(model, connection, fields)
    columns = ", ".join(quote(f.column) for f in fields)
    with transaction.atomic(using=using, savepoint=False), connection.cursor() as cursor:  # as above
        stage = _stage(cursor, connection, model)
        _copy_into(cursor, stage, f"{pk}, {columns}",
                   ([o.pk, *prepared.values({f.attname: getattr(o, f.attname) for f in fields})] for o in objs))
        cursor.execute(f"UPDATE {table} SET " + ", ".join(f"{quote(f.column)} = s.{quote(f.column)}" for f in fields)
                       + f" FROM {stage} s WHERE {table}.{pk} = s.{pk}")
        cursor.execute(f"DELETE FROM {stage}")
