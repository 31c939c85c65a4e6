"""What the queue tells the live side, after its transaction commits: a task changed (its own group,
where a submitter's long-poll or socket waits, and its project's queue group, where the live page
listens), or a device's figures or controls changed (the project's queue group). The database stays the
truth: a lost message only delays a page or a waiter."""
from __future__ import annotations

from django.db import transaction

from apps.common import live


def task_group(public_id: str) -> str:
    return f"scheduler.task.{public_id}"


def project_group(project_id: int) -> str:
    return f"scheduler.project.{project_id}"


def publish_task(task, state: str | None = None) -> None:
    message = {"type": "queue.task", "task_pk": task.pk, "project_id": task.project_id,
               "state": state or task.state}
    pairs = [(task_group(task.public_id), message), (project_group(task.project_id), message)]
    transaction.on_commit(lambda: live.publish_many(pairs), robust=True)


def publish_tasks(project_id: int, tasks: list[tuple[int, str]], state: str) -> None:
    """Several tasks (pk, public id) of one project moved to ``state`` (the dispatcher's admissions): one
    publish after the commit."""
    pairs = []
    for pk, public_id in tasks:
        message = {"type": "queue.task", "task_pk": pk, "project_id": project_id, "state": state}
        pairs += [(task_group(public_id), message), (project_group(project_id), message)]
    if pairs:
        transaction.on_commit(lambda: live.publish_many(pairs), robust=True)


def publish_queue(project_ids) -> None:
    """The queue's figures moved (admissions, readings, controls): pages re-read."""
    pairs = [(project_group(p), {"type": "queue.changed", "project_id": p}) for p in set(project_ids)]
    if pairs:
        transaction.on_commit(lambda: live.publish_many(pairs), robust=True)
