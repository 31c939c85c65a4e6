from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.audit.anchors import AnchorFileError, audit_anchor_check, audit_anchor_last
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_chain_verify


class Command(BaseCommand):
    help = ("Verify the audit log's hash chain and compare its end with the last anchor; print what is "
            "broken and exit non-zero if anything is.")

    def add_arguments(self, parser):
        parser.add_argument("--anchors", metavar="PATH",
                            help="the anchor file to compare with (default: AUDIT_ANCHOR_FILE)")

    def handle(self, *args, **options):
        problems = []
        first = next(audit_chain_verify(), None)
        if first is not None:
            problems.append(f"audit chain broken at row #{first.seq} (id {first.pk}): {first.reason}")

        path = Path(options["anchors"] or settings.AUDIT_ANCHOR_FILE)
        if options["anchors"] and not path.exists():
            raise CommandError(f"no anchor file at {path}")
        anchor_note = ""
        try:
            anchor = audit_anchor_last(path=path)
        except AnchorFileError as exc:
            problems.append(str(exc))
        else:
            if anchor is None:
                anchor_note = (f"no anchor found at {path}: rows deleted from the end of the chain "
                               "cannot be detected without one")
            elif (problem := audit_anchor_check(anchor)) is not None:
                problems.append(f"audit chain does not match its last anchor ({path}): {problem}")
            else:
                anchor_note = f"last anchor (seq {anchor.seq}, taken {anchor.anchored_at}) matches"

        if problems:
            raise CommandError("; ".join(problems))
        tip = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
        if tip is None:
            self.stdout.write("audit chain OK: no rows yet")
        else:
            self.stdout.write(f"audit chain OK: {tip[0]} rows, tip {tip[1]}")
        self.stdout.write(anchor_note)
