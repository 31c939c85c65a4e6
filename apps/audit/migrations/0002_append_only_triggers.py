"""Make audit_auditevent append-only in the database itself.

PostgreSQL: row triggers refuse UPDATE and DELETE; a statement trigger refuses TRUNCATE unless the
session has set ``controlplane.allow_audit_truncate = on`` (used only by the test suite's flush
between transactional tests; ordinary code never sets it). SQLite: triggers refuse UPDATE and DELETE.
"""
from django.db import migrations

PG_FORWARD = """
CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only: % refused on audit_auditevent', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION audit_refuse_truncate() RETURNS trigger AS $$
BEGIN
    IF coalesce(current_setting('controlplane.allow_audit_truncate', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'audit log is append-only: TRUNCATE refused on audit_auditevent'
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_no_update_delete BEFORE UPDATE OR DELETE ON audit_auditevent
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit_auditevent
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_truncate();
"""

PG_REVERSE = """
DROP TRIGGER IF EXISTS audit_no_update_delete ON audit_auditevent;
DROP TRIGGER IF EXISTS audit_no_truncate ON audit_auditevent;
DROP FUNCTION IF EXISTS audit_refuse_change();
DROP FUNCTION IF EXISTS audit_refuse_truncate();
"""

SQLITE_FORWARD = [
    """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_auditevent
       BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused on audit_auditevent'); END;""",
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_auditevent
       BEGIN SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused on audit_auditevent'); END;""",
]
SQLITE_REVERSE = ["DROP TRIGGER IF EXISTS audit_no_update;", "DROP TRIGGER IF EXISTS audit_no_delete;"]


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD, params=None)
    elif vendor == "sqlite":
        for sql in SQLITE_FORWARD:
            schema_editor.execute(sql)


def reverse(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_REVERSE, params=None)
    elif vendor == "sqlite":
        for sql in SQLITE_REVERSE:
            schema_editor.execute(sql)


class Migration(migrations.Migration):
    dependencies = [("audit", "0001_initial")]
    operations = [migrations.RunPython(forward, reverse)]
