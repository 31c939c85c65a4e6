from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The audit UI: server-rendered pages and their live consumers. No models: it reads other apps'
    selectors (STYLE.md §10, "Pages")."""

    name = "apps.dashboard"
    label = "dashboard"
    verbose_name = "Dashboard"
