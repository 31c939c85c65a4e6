from django.apps import AppConfig


class ProjectsConfig(AppConfig):
    name = "apps.projects"
    label = "projects"
    verbose_name = "Projects and access"

    def ready(self):
        from . import schema  # noqa: F401 - registers the OpenAPI auth extension
