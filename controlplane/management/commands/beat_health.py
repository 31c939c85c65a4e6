"""Whether beat is alive: it has run one of its interval entries recently (docker compose's health check of
the beat service). Beat keeps its schedule in the database (django-celery-beat) and writes each entry's
last run there at least every few minutes, so a beat that stopped shows as an old ``last_run_at``."""
from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Max
from django.utils import timezone
from django_celery_beat.models import PeriodicTask


class Command(BaseCommand):
    help = "Exit 0 when beat ran one of its interval entries in the last --within seconds, else 1."

    def add_arguments(self, parser):
        parser.add_argument("--within", type=int, default=600,
                            help="seconds (beat writes its entries' last runs every 3 minutes at most)")

    def handle(self, *args, within: int, **options):
        last = (PeriodicTask.objects.filter(enabled=True, interval__isnull=False)
                .aggregate(at=Max("last_run_at"))["at"])
        if last is None or last < timezone.now() - timedelta(seconds=within):
            raise CommandError(f"beat has run nothing in the last {within} s (last run: {last or 'never'})")
        self.stdout.write(f"beat ran an entry at {last.isoformat()}")
