"""Keyset (cursor) pagination for the pages: a page is "the next N after this row", never an OFFSET
and never a COUNT(*), so page 1,000 of a million runs costs what page 1 does."""
from __future__ import annotations

import base64
import binascii
from datetime import datetime

from django.db.models import Q, QuerySet
from django.http import Http404


def encode(when: datetime, pk: int) -> str:
    return base64.urlsafe_b64encode(f"{when.isoformat()}|{pk}".encode()).decode().rstrip("=")


def decode(token: str) -> tuple[datetime, int]:
    """A cursor this module made; anything else is a 404 (a stale or hand-edited link)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        when, _, pk = raw.rpartition("|")
        return datetime.fromisoformat(when), int(pk)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Http404 from None


def page(queryset: QuerySet, token: str | None, *, size: int, field: str = "started_at",
         descending: bool = True) -> tuple[list, str | None]:
    """One page of ``queryset`` (ordered by ``field`` then pk, newest first unless ``descending`` is
    False) after the row ``token`` names, and the cursor of the next page (None on the last)."""
    op = "lt" if descending else "gt"
    if token:
        when, pk = decode(token)
        queryset = queryset.filter(Q(**{f"{field}__{op}": when}) | Q(**{field: when, f"pk__{op}": pk}))
    order = (f"-{field}", "-pk") if descending else (field, "pk")
    rows = list(queryset.order_by(*order)[:size + 1])
    more = len(rows) > size
    rows = rows[:size]
    return rows, (encode(getattr(rows[-1], field), rows[-1].pk) if more else None)
