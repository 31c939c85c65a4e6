from django.apps import AppConfig


class SchedulerConfig(AppConfig):
    """The GPU-aware queue: work is admitted only where its GPU has the memory for it, and operators
    watch and steer the queue live."""

    name = "apps.scheduler"
    label = "scheduler"
    verbose_name = "GPU queue"
