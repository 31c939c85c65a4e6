"""Tampering with the audit table in tests, the way an attacker with raw database access would."""
from __future__ import annotations

from django.db import connection


def bypass_triggers() -> None:
    """Lift the append-only triggers (PostgreSQL: disable them; SQLite: drop them)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER USER")
        else:
            cursor.execute("DROP TRIGGER audit_no_update")
            cursor.execute("DROP TRIGGER audit_no_delete")
