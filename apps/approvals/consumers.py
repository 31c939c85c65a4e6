"""An agent waiting on a WebSocket: ``/ws/approvals/{id}`` with its key (``Authorization: Bearer`` or
``X-API-Key``, the ``approvals`` scope). It is sent the approval at once and again on every change,
and the socket is closed (1000) once it is no longer pending. Keys only: the route sits outside the
pages' origin check, so a browser's session is not read here (the pages have their own channels).

Like the long-poll: subscribe first, then read; every message is read from the database."""
from __future__ import annotations

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import live
from .models import Approval
from .waiter import Refused, principal, read_approval

CLOSE = {401: 4401, 403: 4403, 404: 4404}


class ApprovalWaitConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None

    async def connect(self):
        approval_id = self.scope["url_route"]["kwargs"]["approval_id"]
        try:
            self.access = await principal(self.scope, keys_only=True)
            await read_approval(self.access, approval_id)
        except Refused as exc:
            await self.accept()
            await self.send_json({"error_code": exc.code, "message": exc.message})
            await self.close(code=CLOSE.get(exc.status, 4400))
            return
        self.approval_id = approval_id
        self.group = live.approval_group(approval_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self._send_state()

    async def _send_state(self):
        try:
            approval, body = await read_approval(self.access, self.approval_id)
        except Refused:
            await self.close(code=4404)
            return
        await self.send_json(body)
        if approval.state != Approval.State.PENDING:
            await self.close(code=1000)

    async def approval_changed(self, event):
        await self._send_state()

    async def disconnect(self, code):
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
