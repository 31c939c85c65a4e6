from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .models import GENESIS_HASH, AuditEvent


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    pk: int | None
    reason: str


def audit_chain_verify(*, chunk_size: int = 2000) -> Iterator[ChainBreak]:
    """Walk the whole chain in order and yield every row where it breaks.

    Detects an edited row (its hash no longer matches its content), a deleted or inserted row (a gap
    in ``seq`` or a ``prev_hash`` that is not the previous row's hash). Removing the newest rows
    leaves a shorter valid chain; ``anchors.audit_anchor_check`` compares the end with the last anchor.
    """
    expected_seq, prev_hash = 1, GENESIS_HASH
    for event in AuditEvent.objects.order_by("seq").iterator(chunk_size=chunk_size):
        if event.seq != expected_seq:
            yield ChainBreak(event.seq, event.pk, f"sequence gap: expected #{expected_seq}, found #{event.seq}")
        elif event.prev_hash != prev_hash:
            yield ChainBreak(event.seq, event.pk, "prev_hash does not match the previous row's hash")
        if event.compute_hash() != event.hash:
            yield ChainBreak(event.seq, event.pk, "content does not match its hash (row edited)")
        expected_seq, prev_hash = event.seq + 1, event.hash
