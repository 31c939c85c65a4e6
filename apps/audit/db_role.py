"""The PostgreSQL role the application runs as, which cannot rewrite the audit log.

The audit table's triggers stop UPDATE, DELETE and TRUNCATE, but the table's owner can disable its
triggers and a superuser can switch every trigger off (``SET session_replication_role = replica``).
So the application connects as a role that owns nothing and is no superuser, with every data right
on every table except the audit table, where it may only SELECT and INSERT; migrations run as the
owner, who then runs ``manage.py db_app_role`` to (re)apply these grants.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.db import connection, transaction
from psycopg import sql

from .models import AuditEvent

# The attributes the role must have, as pg_roles names them, with the keyword that sets each.
_ATTRIBUTES = {
    "rolcanlogin": (True, "LOGIN"),
    "rolsuper": (False, "NOSUPERUSER"),
    "rolcreatedb": (False, "NOCREATEDB"),
    "rolcreaterole": (False, "NOCREATEROLE"),
    "rolreplication": (False, "NOREPLICATION"),
    "rolbypassrls": (False, "NOBYPASSRLS"),
}


class AppRoleError(Exception):
    pass


@dataclass(frozen=True)
class AppRoleResult:
    role: str
    created: bool
    schema: str
    tables: int


def _one(cursor, query, params=()):
    cursor.execute(query, params)
    return cursor.fetchone()


@transaction.atomic
def db_app_role_ensure(*, role: str, password: str | None = None) -> AppRoleResult:
    """Create or update ``role`` and set its rights from scratch; idempotent (run it after every migrate).

    Run as the tables' owner (the migrating role; creating a role also needs CREATEROLE or superuser).
    In one transaction, so the application never sees the rights half applied:

    1. create the role, or alter only the attributes that differ (a non-superuser owner may not even
       restate NOSUPERUSER), LOGIN, no superuser/createdb/createrole/replication/bypassrls; a given
       password is hashed here (SCRAM), so the server's statement log never sees it;
    2. CONNECT and TEMPORARY (the bulk writers COPY through temporary tables) on the database, USAGE
       on the audit table's schema;
    3. on every table in that schema: revoke all, grant SELECT, INSERT, UPDATE, DELETE; then revoke
       UPDATE and DELETE on the audit table (no TRUNCATE, TRIGGER or REFERENCES anywhere);
    4. USAGE, SELECT on the schema's sequences; default privileges so tables and sequences the owner
       creates later get the same (the audit table's exception is re-applied by the next run);
    5. check the result and raise AppRoleError, rolling everything back, if the role could still
       change the audit table (a grant to PUBLIC, membership in the owner's role).
    """
    if connection.vendor != "postgresql":
        raise AppRoleError("an application role needs PostgreSQL (this database is "
                           f"{connection.vendor})")
    audit_table = AuditEvent._meta.db_table
    connection.ensure_connection()
    raw = connection.connection
    with connection.cursor() as cursor:
        found = _one(cursor, "SELECT n.nspname, c.relowner::regrole::text, current_user, current_database() "
                             "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE c.oid = to_regclass(%s)", [audit_table])
        if found is None:
            raise AppRoleError(f"table {audit_table} not found: run migrate first")
        schema, table_owner, me, database = found
        if role in (me, table_owner):
            raise AppRoleError(f"{role} owns the tables (or runs this command): the application role must "
                               "be a different one")
        attrs = _one(cursor, f"SELECT {', '.join(_ATTRIBUTES)}, oid FROM pg_roles WHERE rolname = %s", [role])
        if attrs is not None:
            owns = _one(cursor, "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relowner = %s) "
                                "OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspowner = %s) "
                                "OR EXISTS (SELECT 1 FROM pg_database WHERE datdba = %s "
                                "AND datname = current_database())", [attrs[-1]] * 3)[0]
            if owns:
                raise AppRoleError(f"{role} owns objects in {database}: the application role must own nothing")

        ident = sql.Identifier(role)
        secret = sql.SQL("")
        if password:
            hashed = raw.pgconn.encrypt_password(password.encode(), role.encode())
            secret = sql.SQL(" PASSWORD {}").format(sql.Literal(hashed.decode()))
        if attrs is None:
            keywords = sql.SQL(" ".join(keyword for _, keyword in _ATTRIBUTES.values()))
            statements = [sql.SQL("CREATE ROLE {} WITH {}{}").format(ident, keywords, secret)]
        else:
            wrong = [keyword for value, (wanted, keyword) in zip(attrs, _ATTRIBUTES.values(), strict=False)
                     if value != wanted]
            statements = []
            if wrong or password:
                statements.append(sql.SQL("ALTER ROLE {} WITH {}{}").format(
                    ident, sql.SQL(" ".join(wrong or ["LOGIN"])), secret))
        schema_ident, table = sql.Identifier(schema), sql.Identifier(schema, audit_table)
        statements += [
            sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(sql.Identifier(database), ident),
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema_ident, ident),
            sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(schema_ident, ident),
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                schema_ident, ident),
            sql.SQL("REVOKE UPDATE, DELETE ON {} FROM {}").format(table, ident),
            sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(schema_ident, ident),
            sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(schema_ident, ident),
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}")
            .format(schema_ident, ident),
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT USAGE, SELECT ON SEQUENCES TO {}").format(
                schema_ident, ident),
        ]
        for statement in statements:
            # Composed into one string here: utility statements take no bound parameters.
            cursor.execute(statement.as_string(raw))

        qualified = f"{schema}.{audit_table}"
        can = _one(cursor, "SELECT has_table_privilege(%s, %s, 'UPDATE'), has_table_privilege(%s, %s, 'DELETE'), "
                           "has_table_privilege(%s, %s, 'TRUNCATE'), pg_has_role(%s, %s, 'MEMBER'), "
                           "(SELECT rolsuper FROM pg_roles WHERE rolname = %s)",
                   [role, qualified] * 3 + [role, table_owner, role])
        if any(can):
            what = [name for name, flag in zip(("UPDATE", "DELETE", "TRUNCATE", f"membership in {table_owner}",
                                                "superuser"), can, strict=True) if flag]
            raise AppRoleError(f"{role} could still change {audit_table} through: {', '.join(what)} "
                               "(granted to PUBLIC or to a role it belongs to?); nothing was changed")
        tables = _one(cursor, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                              "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')", [schema])[0]
    return AppRoleResult(role=role, created=attrs is None, schema=schema, tables=tables)
