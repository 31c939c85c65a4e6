"""``field__any_of=[...]``: membership in a long list, as one array parameter on PostgreSQL.

``field__in=[...]`` sends one parameter per value, and Django compiles each one; with the thousands of
span ids a projection batch asks about, compiling and planning the IN list cost more than running it
(measured in bench/RESULTS.md). Elsewhere (SQLite) it is an ordinary IN list.
"""
from __future__ import annotations

from django.core.exceptions import EmptyResultSet
from django.db.models import Field, Lookup


@Field.register_lookup
class AnyOf(Lookup):
    lookup_name = "any_of"
    prepare_rhs = False

    def get_db_prep_lookup(self, value, connection):
        field = self.lhs.output_field
        return "%s", [[field.get_db_prep_value(v, connection, prepared=False) for v in value]]

    def as_postgresql(self, compiler, connection):
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        if not rhs_params[0]:
            raise EmptyResultSet
        return f"{lhs} = ANY({rhs})", [*lhs_params, *rhs_params]

    def as_sql(self, compiler, connection):
        lhs, lhs_params = self.process_lhs(compiler, connection)
        _, rhs_params = self.process_rhs(compiler, connection)
        values = list(dict.fromkeys(rhs_params[0]))
        if not values:
            raise EmptyResultSet
        return f"{lhs} IN ({', '.join(['%s'] * len(values))})", [*lhs_params, *values]
