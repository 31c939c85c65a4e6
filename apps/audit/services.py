from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from apps.common.request_context import get_request_id

from .models import GENESIS_HASH, AuditEvent

# Any constant works; it only has to be the same for every writer of the chain.
_CHAIN_LOCK_KEY = 0x636F6E74726F6C  # "control"


@dataclass(frozen=True)
class Actor:
    """Who did it, as the audit row will remember it (strings, so deletions cannot erase it)."""

    type: str
    id: str
    repr: str
    role: str = ""

    @classmethod
    def system(cls, what: str = "system") -> Actor:
        return cls(type=AuditEvent.ActorType.SYSTEM, id="", repr=what, role="system")


def _plain(value):
    """Round-trip through JSON so the hash sees exactly what the JSONField will give back."""
    if value is None:
        return None
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def _lock_chain() -> None:
    """Serialise appends so that two writers never read the same tip and fork the chain.

    PostgreSQL: a transaction-scoped advisory lock, released at COMMIT/ROLLBACK. SQLite: the
    settings open every transaction with BEGIN IMMEDIATE, which already holds the single write lock.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CHAIN_LOCK_KEY])


@transaction.atomic
def audit_record(
    *,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: str | int,
    object_repr: str,
    project_id: int | None = None,
    project_slug: str = "",
    before: dict | None = None,
    after: dict | None = None,
) -> AuditEvent:
    """Append one row to the chain. Call it inside the transaction of the change it records,
    so that a change that rolls back leaves no audit row and a failed audit write undoes the change.
    """
    _lock_chain()
    tip = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
    seq, prev_hash = (tip[0] + 1, tip[1]) if tip else (1, GENESIS_HASH)
    event = AuditEvent(
        seq=seq,
        created_at=timezone.now().astimezone(UTC),
        project_id=project_id,
        project_slug=project_slug,
        actor_type=actor.type,
        actor_id=str(actor.id),
        actor_repr=actor.repr[:200],
        actor_role=actor.role[:100],
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        object_repr=str(object_repr)[:200],
        before=_plain(before),
        after=_plain(after),
        request_id=get_request_id(),
        prev_hash=prev_hash,
    )
    event.hash = event.compute_hash()
    event.save(force_insert=True)
    return event
