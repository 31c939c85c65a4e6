from celery import shared_task
from django.core.cache import cache


@shared_task(name="common.ping", queue="default", ignore_result=True)
def ping(token: str) -> str:
    """Liveness probe for workers: records that a worker ran it (see apps.common.views.healthz)."""
    cache.set(f"worker-ping:{token}", "pong", timeout=60)
    return "pong"
