from django.apps import AppConfig


class ControlplaneConfig(AppConfig):
    """The project package as an app: it has no models, only the composition root's commands
    (``serve``: web + worker + beat + gRPC in one process), which import every layer of ``apps``."""

    name = "controlplane"
    label = "controlplane"
    verbose_name = "Control plane"
