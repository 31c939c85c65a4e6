"""Anchors: the chain's tip, kept outside the audit table.

The hash chain catches an edited or removed row anywhere except at the end: delete the newest rows
and what is left is a shorter chain that still verifies. So beat writes the tip (seq, hash, times)
somewhere the database cannot reach, every AUDIT_ANCHOR_SECONDS: a log line, a line appended to
AUDIT_ANCHOR_FILE (JSON Lines, fsync'd) and, when AUDIT_ANCHOR_WEBHOOK_URL is set, a POST there.
``audit_verify`` then checks that the table still holds the last anchored row with the same hash.

An anchor only moves forward: if the table no longer holds the last anchor, the tick refuses to write
a new one (it would record the shortened chain as the truth) and logs an error on every tick until
someone looks. After restoring a database backup, move the old anchor file aside.
"""
from __future__ import annotations

import json
import logging
import os
import re
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .models import AuditEvent

logger = logging.getLogger(__name__)

_HASH = re.compile(r"[0-9a-f]{64}")
# Anchors are ~200 bytes; the newest one is always within this many bytes of the end of the file.
_TAIL_BYTES = 64 * 1024


class AnchorFileError(Exception):
    """The anchor file exists but holds no anchor that can be read."""


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str
    created_at: str  # the tip row's time
    anchored_at: str  # when the anchor was taken

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, line: bytes) -> Anchor | None:
        try:
            data = json.loads(line)
            anchor = cls(seq=data["seq"], hash=data["hash"], created_at=data.get("created_at", ""),
                         anchored_at=data.get("anchored_at", ""))
        except (ValueError, TypeError, KeyError):
            return None
        if type(anchor.seq) is not int or anchor.seq < 1 or not isinstance(anchor.hash, str):
            return None
        return anchor if _HASH.fullmatch(anchor.hash) else None


def audit_anchor_last(*, path: Path | None = None) -> Anchor | None:
    """The newest anchor in the file, or None when there is no file yet.

    Reads only the end of the file. A torn last line (a crash mid-write) is skipped for the one before
    it; a file with no readable anchor at its end raises AnchorFileError.
    """
    path = Path(path or settings.AUDIT_ANCHOR_FILE)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL_BYTES))
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return None
    if size > _TAIL_BYTES:
        lines = lines[1:]  # the first line read may be the end of a longer one
    for line in reversed(lines):
        anchor = Anchor.parse(line) if line.strip() else None
        if anchor is not None:
            return anchor
    raise AnchorFileError(f"anchor file {path} holds no readable anchor")


def audit_anchor_check(anchor: Anchor) -> str | None:
    """What is wrong with the table against ``anchor``, or None when it still holds the anchored row."""
    tip_seq = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
    if tip_seq < anchor.seq:
        return (f"rows missing at the end: anchored seq {anchor.seq} hash {anchor.hash}, "
                f"table ends at seq {tip_seq}")
    row_hash = AuditEvent.objects.filter(seq=anchor.seq).values_list("hash", flat=True).first()
    if row_hash != anchor.hash:
        return (f"row #{anchor.seq} does not match its anchor: anchored hash {anchor.hash}, "
                f"table has {row_hash or 'no such row'}")
    return None


def _append_line(path: Path, line: str) -> None:
    """Append one line and fsync it (and, for a new file, its directory) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    # O_APPEND: concurrent writers (a redelivered tick) each land one whole line at the end.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _post(url: str, payload: dict) -> None:
    """POST ``payload`` as JSON; a failure is logged, never raised (the file anchor is already written)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=settings.AUDIT_ANCHOR_WEBHOOK_TIMEOUT) as response:
            response.read()
    except Exception as exc:  # any failure of the receiver: refused, timeout, 5xx, bad response
        logger.warning("audit anchor: webhook %s failed: %s", url, exc)


def audit_anchor_tip(*, path: Path | None = None, webhook_url: str | None = None) -> dict:
    """Anchor the chain's current tip outside the table (beat, every AUDIT_ANCHOR_SECONDS).

    1. Read the last anchor. If the table no longer holds it (rows deleted from the end, or the end
       rewritten), log an error, tell the webhook, write nothing and return ``status: refused``.
    2. No rows yet: nothing to anchor (``status: empty``).
    3. Otherwise append the tip to the file (fsync'd), log it, then POST it to the webhook.

    Returns what it did, for the task's log.
    """
    path = Path(path or settings.AUDIT_ANCHOR_FILE)
    webhook_url = settings.AUDIT_ANCHOR_WEBHOOK_URL if webhook_url is None else webhook_url
    try:
        last = audit_anchor_last(path=path)
    except AnchorFileError as exc:
        # Someone or something damaged the file: say so, and anchor afresh rather than never again.
        logger.error("audit anchor: %s", exc)
        last = None
    if last is not None:
        problem = audit_anchor_check(last)
        if problem is not None:
            logger.error("audit anchor refused, the audit table no longer matches its last anchor: %s", problem)
            if webhook_url:
                _post(webhook_url, {"type": "audit.anchor_refused", "problem": problem, "anchor": last.as_dict()})
            return {"status": "refused", "problem": problem}
    tip = AuditEvent.objects.order_by("-seq").values_list("seq", "hash", "created_at").first()
    if tip is None:
        logger.info("audit anchor: no audit rows yet, nothing to anchor")
        return {"status": "empty"}
    anchor = Anchor(seq=tip[0], hash=tip[1], created_at=tip[2].astimezone(UTC).isoformat(),
                    anchored_at=timezone.now().astimezone(UTC).isoformat())
    _append_line(path, json.dumps(anchor.as_dict(), sort_keys=True) + "\n")
    # The log line is an anchor too, wherever the logs are shipped.
    logger.info("audit anchor: seq=%d hash=%s created_at=%s anchored_at=%s",
                anchor.seq, anchor.hash, anchor.created_at, anchor.anchored_at)
    if webhook_url:
        _post(webhook_url, {"type": "audit.anchor", **anchor.as_dict()})
    return {"status": "anchored", "seq": anchor.seq, "hash": anchor.hash}
