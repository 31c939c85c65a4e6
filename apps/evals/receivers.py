"""The evals' receivers of the run log's signals (connected in ``apps.EvalsConfig.ready``). Both run
inside the projection's transaction: what they write commits with the spans and the finish."""
from __future__ import annotations

from . import services


def on_runs_finishing(sender, project_id: int, runs, **kwargs) -> None:
    services.after_run_schedule(project_id=project_id, runs=runs)


def on_spans_projected(sender, project_id: int, changes, **kwargs) -> None:
    # A lookup or two per span on the projection's path; only spans with evaluations go further. A
    # span's details are any JSON (a producer's list, a string): only an object holds evaluations.
    with_evals = [c for c in changes if isinstance(details := c.after.get("details"), dict)
                  and isinstance(details.get("evaluations"), list) and details["evaluations"]]
    if with_evals:
        services.trace_scores_store(with_evals)
