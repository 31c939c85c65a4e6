from django.apps import AppConfig


class TracesConfig(AppConfig):
    name = "apps.traces"
    label = "traces"
    verbose_name = "Traces"

    def ready(self) -> None:
        from apps.common import health

        from . import services

        health.register("dead_letters", services.dead_letter_counts)
