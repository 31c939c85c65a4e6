"""Reading a streamed response in a test the way the ASGI server does: exports stream from an async
iterator, which Django's test client hands back unread."""
from __future__ import annotations

from asgiref.sync import async_to_sync


def read_streamed(response) -> bytes:
    async def collect():
        return b"".join([c if isinstance(c, bytes) else c.encode() async for c in response.streaming_content])

    return async_to_sync(collect)()
