"""Reads of the audit log: the chain's checks, and the rows a caller may see.

This app sits below projects and cannot ask who sees what: a caller passes a ``ProjectScope``, which
``apps.projects.access.ProjectAccess`` (the one authorization path) is, and its ``apply`` decides the
rows, exactly as the audit console (``projects.admin.ScopedAuditEventAdmin``) does.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from django.db.models import QuerySet

from .models import GENESIS_HASH, AuditEvent


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    pk: int | None
    reason: str


@dataclass(frozen=True)
class ChainTip:
    """The newest row's place and hash: what an anchor or an exported copy is compared with."""

    seq: int
    hash: str


@dataclass(frozen=True)
class ChainReport:
    rows_checked: int
    break_count: int
    breaks: tuple[ChainBreak, ...]  # the first ones, at most ``max_breaks``
    tip: ChainTip | None  # the last row checked; None for an empty chain

    @property
    def ok(self) -> bool:
        return self.break_count == 0


def _chain(chunk_size: int) -> Iterator[AuditEvent]:
    return AuditEvent.objects.order_by("seq").iterator(chunk_size=chunk_size)


def _breaks(events: Iterable[AuditEvent]) -> Iterator[ChainBreak]:
    expected_seq, prev_hash = 1, GENESIS_HASH
    for event in events:
        if event.seq != expected_seq:
            yield ChainBreak(event.seq, event.pk, f"sequence gap: expected #{expected_seq}, found #{event.seq}")
        elif event.prev_hash != prev_hash:
            yield ChainBreak(event.seq, event.pk, "prev_hash does not match the previous row's hash")
        if event.compute_hash() != event.hash:
            yield ChainBreak(event.seq, event.pk, "content does not match its hash (row edited)")
        expected_seq, prev_hash = event.seq + 1, event.hash


def audit_chain_verify(*, chunk_size: int = 2000) -> Iterator[ChainBreak]:
    """Walk the whole chain in order and yield every row where it breaks.

    Detects an edited row (its hash no longer matches its content), a deleted or inserted row (a gap
    in ``seq`` or a ``prev_hash`` that is not the previous row's hash). Removing the newest rows
    leaves a shorter valid chain; ``anchors.audit_anchor_check`` compares the end with the last anchor.
    """
    return _breaks(_chain(chunk_size))


def audit_chain_report(*, chunk_size: int = 2000, max_breaks: int = 100) -> ChainReport:
    """``audit_chain_verify`` walked to the end, with what a person reading the result needs: how many
    rows were checked, the tip reached, and the first ``max_breaks`` breaks (a table edited wholesale
    breaks at every row; the count says how many there are)."""
    checked, last = 0, None

    def counted() -> Iterator[AuditEvent]:
        nonlocal checked, last
        for event in _chain(chunk_size):
            checked, last = checked + 1, event
            yield event

    breaks: list[ChainBreak] = []
    count = 0
    for found in _breaks(counted()):
        count += 1
        if len(breaks) < max_breaks:
            breaks.append(found)
    return ChainReport(rows_checked=checked, break_count=count, breaks=tuple(breaks),
                       tip=ChainTip(last.seq, last.hash) if last is not None else None)


def audit_chain_tip() -> ChainTip | None:
    """The newest row's seq and hash (one indexed query); None while the log is empty. The chain is
    global: this says nothing of the row's project or content."""
    row = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
    return ChainTip(*row) if row is not None else None


class ProjectScope(Protocol):
    """Which projects' rows a caller sees: ``ProjectAccess.apply`` (a person their projects; a superuser
    every row, project-less ones included)."""

    def apply(self, queryset: QuerySet, project_field: str = ...) -> QuerySet: ...


@dataclass(frozen=True)
class AuditFilters:
    action: str = ""  # exact, or a prefix when it ends with "*"
    actor: str = ""  # part of the actor's name (a username, "key <name> (<prefix>)", a system task)
    object_type: str = ""  # exact, ``app_label.model``
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


def audit_events(scope: ProjectScope, filters: AuditFilters) -> QuerySet[AuditEvent]:
    """The rows ``scope`` may see that match ``filters``, newest first (by ``seq``)."""
    qs = scope.apply(AuditEvent.objects.all(), "project_id")
    if filters.action.endswith("*"):
        qs = qs.filter(action__startswith=filters.action[:-1])
    elif filters.action:
        qs = qs.filter(action=filters.action)
    if filters.actor:
        qs = qs.filter(actor_repr__icontains=filters.actor)
    if filters.object_type:
        qs = qs.filter(object_type=filters.object_type)
    if filters.since is not None:
        qs = qs.filter(created_at__gte=filters.since)
    if filters.until is not None:
        qs = qs.filter(created_at__lt=filters.until)
    return qs.order_by("-seq")


def audit_event_page(scope: ProjectScope, filters: AuditFilters, *, before: int | None = None,
                     size: int = 50) -> tuple[list[AuditEvent], int | None]:
    """One page of ``audit_events``: the rows older than ``before`` (a ``seq``; None: the newest), and
    the cursor of the next page (None on the last). Keyset pagination, one query: no COUNT, and a deep
    page costs what the first does."""
    qs = audit_events(scope, filters)
    if before is not None:
        qs = qs.filter(seq__lt=before)
    rows = list(qs[:size + 1])
    return rows[:size], rows[size - 1].seq if len(rows) > size else None
