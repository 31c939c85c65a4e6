from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware

from .request_context import new_request_id, reset_request_id, set_request_id


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
