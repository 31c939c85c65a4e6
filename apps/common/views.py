import sys
import time
import uuid

from django.core.cache import cache
from django.db import InterfaceError, OperationalError, connection
from django.http import JsonResponse
from django.views.defaults import page_not_found
from django.views.defaults import server_error as html_server_error

from . import health
from .errors import json_404, json_500, unavailable_response

_API_PREFIXES = ("/api/", "/v1/")
WORKER_PING_TIMEOUT_S = 10


def healthz(request):
    """Readiness: 200 when the database answers, 503 + Retry-After when it does not. The body adds
    what apps registered (``health.register``), e.g. ``dead_letters`` waiting for a look.

    ``?worker=1`` also sends a task through the broker and waits for a worker to run it.
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        return unavailable_response()
    body = {"status": "ok", **health.report()}
    if request.GET.get("worker"):
        from .tasks import ping

        token = uuid.uuid4().hex
        ping.delay(token)
        deadline = time.monotonic() + WORKER_PING_TIMEOUT_S
        while cache.get(f"worker-ping:{token}") is None:
            if time.monotonic() > deadline:
                return unavailable_response()
            time.sleep(0.1)
        body["worker"] = "ok"
    return JsonResponse(body)


def not_found(request, exception=None):
    if request.path.startswith(_API_PREFIXES):
        return json_404(request, exception)
    return page_not_found(request, exception)


def server_error(request):
    # A database fault that escaped every handler (say, in a middleware's response hook) is
    # still transient: 503 + Retry-After, not 500.
    if isinstance(sys.exc_info()[1], (OperationalError, InterfaceError)):
        return unavailable_response()
    if request.path.startswith(_API_PREFIXES):
        return json_500(request)
    return html_server_error(request)
