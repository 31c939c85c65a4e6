from django.core.management.base import BaseCommand, CommandError

from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_chain_verify


class Command(BaseCommand):
    help = "Verify the audit log's hash chain; print the first broken row and exit non-zero if any."

    def handle(self, *args, **options):
        first = next(audit_chain_verify(), None)
        if first is not None:
            raise CommandError(f"audit chain broken at row #{first.seq} (id {first.pk}): {first.reason}")
        tip = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
        if tip is None:
            self.stdout.write("audit chain OK: no rows yet")
        else:
            self.stdout.write(f"audit chain OK: {tip[0]} rows, tip {tip[1]}")
