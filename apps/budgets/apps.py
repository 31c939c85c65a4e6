from django.apps import AppConfig


class BudgetsConfig(AppConfig):
    """Costs: every model call priced, rolled up per run and per day, spikes caught (and, next, caps)."""

    name = "apps.budgets"
    label = "budgets"
    verbose_name = "Costs"

    def ready(self) -> None:
        from apps.projects.signals import project_updated
        from apps.traces.signals import spans_projected

        from . import rollups

        spans_projected.connect(rollups.on_spans_projected, dispatch_uid="budgets.rollups")
        project_updated.connect(rollups.on_project_updated, dispatch_uid="budgets.time_zone")
