"""Spans and span updates are append-only: the database refuses to rewrite them (deleting old rows,
for retention, stays possible). Same approach as the audit log's triggers."""
from django.db import migrations

TABLES = ("traces_span", "traces_spanupdate")

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION traces_refuse_update() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'spans and span updates are append-only: rows cannot be updated';
END;
$$ LANGUAGE plpgsql;
"""


def forwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FUNCTION)
        for table in TABLES:
            schema_editor.execute(f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
                                  f"FOR EACH ROW EXECUTE FUNCTION traces_refuse_update()")
    elif vendor == "sqlite":
        for table in TABLES:
            schema_editor.execute(f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
                                  f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: rows cannot be updated'); END")


def backwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for table in TABLES:
        if vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_no_update ON {table}")
        elif vendor == "sqlite":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
    if vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS traces_refuse_update()")


class Migration(migrations.Migration):
    dependencies = [("traces", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
