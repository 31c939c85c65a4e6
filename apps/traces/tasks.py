from celery import shared_task

from . import services


@shared_task(name="traces.inbox_project", queue="ingest", ignore_result=True)
def inbox_project(batch_id: int | None = None) -> int:
    """Project accepted batches into runs, spans and tool calls (see services.inbox_project)."""
    return services.inbox_project(batch_id=batch_id)


@shared_task(name="traces.inbox_sweep", queue="ingest", ignore_result=True)
def inbox_sweep() -> dict:
    """Beat: pick up batches whose enqueue was lost, whose worker died, or whose retry is due."""
    return services.inbox_sweep()
