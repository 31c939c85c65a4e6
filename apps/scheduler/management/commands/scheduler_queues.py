"""The Celery queues of this machine's GPUs (one per GPU, ``dispatcher.device_queue``), comma-separated:
what a GPU host's worker consumes (``make gpu-worker``; the compose file's ``gpu-worker``)."""
from django.core.management.base import BaseCommand

from apps.scheduler import gpus
from apps.scheduler.dispatcher import device_queue


class Command(BaseCommand):
    help = "Print the Celery queues of this machine's GPUs (NVML, else the declared ones), comma-separated."

    def handle(self, *args, **options):
        self.stdout.write(",".join(local_queues()))


def local_queues() -> list[str]:
    return [device_queue(r.gpu) for r in gpus.reader().read()]
