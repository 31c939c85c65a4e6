from django.apps import AppConfig


class EvalsConfig(AppConfig):
    """Evals: quality beside cost and latency, scored from the recorded traces after each run and in
    batches over history."""

    name = "apps.evals"
    label = "evals"
    verbose_name = "Evals"

    def ready(self) -> None:
        from apps.traces.signals import runs_finishing, spans_projected

        from . import receivers

        runs_finishing.connect(receivers.on_runs_finishing, dispatch_uid="evals.after_run")
        spans_projected.connect(receivers.on_spans_projected, dispatch_uid="evals.trace_scores")
