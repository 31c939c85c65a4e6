import logging

from asgiref.sync import iscoroutinefunction
from django.db import InterfaceError, OperationalError
from django.utils.decorators import sync_and_async_middleware
from django.utils.deprecation import MiddlewareMixin

from .errors import unavailable_response
from .request_context import new_request_id, reset_request_id, set_request_id

logger = logging.getLogger(__name__)


@sync_and_async_middleware
def RequestIdMiddleware(get_response):  # noqa: N802 - Django middleware naming
    """Give every request an id (X-Request-ID in, X-Request-ID out) that audit rows record."""

    if iscoroutinefunction(get_response):

        async def middleware(request):
            request.request_id = new_request_id(request.headers.get("X-Request-ID"))
            token = set_request_id(request.request_id)
            try:
                response = await get_response(request)
            finally:
                reset_request_id(token)
            response["X-Request-ID"] = request.request_id
            return response

    else:

        def middleware(request):
            request.request_id = new_request_id(request.headers.get("X-Request-ID"))
            token = set_request_id(request.request_id)
            try:
                response = get_response(request)
            finally:
                reset_request_id(token)
            response["X-Request-ID"] = request.request_id
            return response

    return middleware


class DatabaseUnavailableMiddleware(MiddlewareMixin):
    """Outside the API (the admin, pages), a database that cannot be reached is 503 + Retry-After too,
    never a 500: the fault is transient and a retry will do. (API views answer this in errors.py.)

    It is deliberately sync-only and last in MIDDLEWARE: Django then runs every other middleware in
    sync mode on one worker thread per request, instead of hopping between the event loop and a
    thread for each of their process_request/process_response hooks. The view is still reached
    through Django's async core (a couple of switches, not a dozen). Measured in bench/RESULTS.md.
    """

    sync_capable = True
    async_capable = False

    def process_exception(self, request, exception):
        if isinstance(exception, (OperationalError, InterfaceError)):
            logger.warning("database unavailable on %s: %s", request.path, exception)
            return unavailable_response()
        return None
