from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.audit.db_role import AppRoleError, db_app_role_ensure


class Command(BaseCommand):
    help = ("Create or update the PostgreSQL role the application runs as: it owns nothing, is no "
            "superuser, may read and write every table but only SELECT and INSERT on the audit log. Run it "
            "as the tables' owner after every migrate; it is idempotent.")

    def add_arguments(self, parser):
        parser.add_argument("--role", default="controlplane_app", help="the role's name (default: %(default)s)")
        parser.add_argument("--password", default=None,
                            help="set the role's password (default: DATABASE_APP_PASSWORD or "
                                 "DATABASE_APP_PASSWORD_FILE if set, else leave it as it is)")

    def handle(self, *args, **options):
        password = options["password"] or settings.DATABASE_APP_PASSWORD or None
        try:
            result = db_app_role_ensure(role=options["role"], password=password)
        except AppRoleError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"role {result.role} {'created' if result.created else 'updated'}: login, no superuser; "
            f"SELECT/INSERT/UPDATE/DELETE on the {result.tables} tables of schema {result.schema}, "
            "only SELECT/INSERT on the audit log"
            + ("; password set" if password else ""))
