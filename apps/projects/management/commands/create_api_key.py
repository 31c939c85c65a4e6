from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime

from apps.projects import services
from apps.projects.models import Project


class Command(BaseCommand):
    help = "Create an API key for a project. Prints the key once, and nothing else, on stdout."

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="project slug")
        parser.add_argument("--scopes", required=True, help="comma-separated: ingest,read,budget,approvals,queue")
        parser.add_argument("--name", default="cli", help="a label for the key")
        parser.add_argument("--expires-at", default=None, help="ISO 8601 time after which the key stops working")
        parser.add_argument("--create-project", action="store_true", help="create the project if missing")

    def handle(self, *args, project, scopes, name, expires_at, create_project, **options):
        obj = Project.objects.filter(slug=project).first()
        try:
            if obj is None:
                if not create_project:
                    raise CommandError(f"no project {project!r} (add --create-project to create it)")
                obj = services.project_create(slug=project, name=project, actor=None)
                self.stderr.write(f"created project {project}")
            expiry = None
            if expires_at:
                expiry = parse_datetime(expires_at)
                if expiry is None or expiry.tzinfo is None:
                    raise CommandError("--expires-at: give an ISO 8601 time with a time zone")
            _key, raw = services.api_key_create(project=obj, name=name, scopes=scopes.split(","), actor=None,
                                                expires_at=expiry)
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        self.stdout.write(raw)
