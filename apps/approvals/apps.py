from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    """Approvals: sensitive agent actions wait for a person whose role allows them, and never run by default."""

    name = "apps.approvals"
    label = "approvals"
    verbose_name = "Approvals"
