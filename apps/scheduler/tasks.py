"""Celery tasks of the queue. A task's message carries its id and generation only, on its GPU's queue
(``dispatcher.device_queue``), late-acked with a prefetch of one; everything else is read from the queue
of record when it runs."""
from __future__ import annotations

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from . import dispatcher, executor

WAKE_KEY = "scheduler:wake:{}"


@shared_task(name="scheduler.run", bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True,
             time_limit=settings.SCHEDULER_TASK_TIME_LIMIT + 30, soft_time_limit=settings.SCHEDULER_TASK_TIME_LIMIT)
def run(self, task_pk: int, generation: int) -> str:
    """Run one attempt of a queue task (nothing when a newer generation or another worker has it)."""
    return executor.run(task_pk, generation, worker_id=self.request.id or "")


@shared_task(name="scheduler.unload", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def unload(loaded_pk: int) -> bool:
    return executor.unload(loaded_pk)


@shared_task(name="scheduler.dispatch", queue="default", ignore_result=True)
def dispatch(project_id: int | None = None) -> int:
    cache.delete(WAKE_KEY.format(project_id))
    return dispatcher.dispatch(project_id=project_id)


@shared_task(name="scheduler.tick", queue="default", ignore_result=True)
def tick() -> int:
    return dispatcher.tick()


def wake(project_id: int | None) -> None:
    """Ask for a dispatch of the project's devices soon; wake-ups waiting for the same dispatch coalesce."""
    def send() -> None:
        if cache.add(WAKE_KEY.format(project_id), 1, timeout=5):
            dispatch.apply_async((project_id,))

    transaction.on_commit(send, robust=True)
