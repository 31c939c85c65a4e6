"""``manage.py costs_rederive [--project SLUG] [--since DATE] [--until DATE] [--days N]``: re-price the
spans of a range of days and rebuild the cost rollups from them, reporting every difference it repaired."""
from datetime import date

from django.core.management.base import BaseCommand, CommandError

from apps.budgets.rederive import default_range, rederive
from apps.projects.models import Project


class Command(BaseCommand):
    help = "Re-derive span costs, run costs and the day/hour rollups from the spans; report what differed."

    def add_arguments(self, parser):
        parser.add_argument("--project", help="A project slug (default: every project).")
        parser.add_argument("--since", type=date.fromisoformat, help="First day (the project's), YYYY-MM-DD.")
        parser.add_argument("--until", type=date.fromisoformat, help="Last day, inclusive (default: today).")
        parser.add_argument("--days", type=int, default=30, help="Without --since: this many days up to today.")

    def handle(self, *args, project=None, since=None, until=None, days=30, **options):
        projects = Project.objects.all()
        if project:
            projects = projects.filter(slug=project)
            if not projects:
                raise CommandError(f"No project {project!r}.")
        differences = 0
        for p in projects.order_by("slug"):
            lo, hi = default_range(p, days)
            lo, hi = since or lo, until or hi
            report = rederive(p, since=lo, until=hi)
            found = sum(report.values())
            differences += found
            detail = ", ".join(f"{k} {v}" for k, v in sorted(report.items())) or "no difference"
            self.stdout.write(f"{p.slug} {lo}..{hi}: {detail}")
        self.stdout.write(f"repaired {differences} difference(s)" if differences else "no difference found")
