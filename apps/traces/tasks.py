"""Celery tasks of the run log: thin wrappers, named for what they call (the logic is in ``inbox`` and
``housekeeping``). Beat schedules are in settings (CELERY_BEAT_SCHEDULE)."""
import logging

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from . import housekeeping, inbox

logger = logging.getLogger(__name__)


@shared_task(name=inbox.DRAIN_TASK, queue="ingest", ignore_result=True)
def inbox_drain(batch_id: int | None = None) -> int:
    """Project accepted batches into runs, spans and tool calls, this one first, then whatever else is
    waiting for up to TRACES_PROJECTION_TASK_SECONDS (see inbox.inbox_drain)."""
    return inbox.inbox_drain(batch_id=batch_id, budget_seconds=settings.TRACES_PROJECTION_TASK_SECONDS)


@shared_task(name="traces.inbox_sweep", queue="ingest", ignore_result=True)
def inbox_sweep() -> dict:
    """Beat: pick up batches whose enqueue was lost, whose worker died, or whose retry is due."""
    return inbox.inbox_sweep()


@shared_task(name="traces.runs_mark_lost", ignore_result=True)
def runs_mark_lost() -> int:
    """Beat: RUNNING runs with no new span for TRACES_LOST_AFTER_MINUTES become LOST."""
    return housekeeping.runs_mark_lost()


@shared_task(name="traces.runs_purge_expired", ignore_result=True)
def runs_purge_expired() -> dict:
    """Beat: delete runs (and their spans) past their project's retention, in bounded chunks."""
    return housekeeping.runs_purge_expired()


@shared_task(name="traces.stats_refresh", ignore_result=True)
def stats_refresh() -> list:
    """Beat: with autovacuum off, ANALYZE the run log's tables whose statistics went stale."""
    return housekeeping.stats_refresh()


@worker_ready.connect
def sweep_when_a_worker_starts(sender=None, **kwargs) -> None:
    """A worker that starts (a replacement for one that was killed, say) takes over what waits now, and
    sweeps again just after the last lease still held runs out, rather than at beat's next tick."""
    try:
        inbox_sweep.apply_async()
        wait = inbox.seconds_until_leases_expire()
        if wait is not None:
            inbox_sweep.apply_async(countdown=wait + 1)
    except Exception as exc:  # noqa: BLE001 - beat's sweep takes over all the same
        logger.warning("could not schedule the start-up sweep: %r", exc)
