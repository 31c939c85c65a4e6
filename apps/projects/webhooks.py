"""Outbound webhooks, the one way every app sends them: an HMAC-signed POST to a URL on the project's
allowlist (checked again when sending: it may have changed since the URL was saved).

The body is JSON; ``X-Controlplane-Signature: t=<unix time>,v1=<hex>`` where ``hex`` is HMAC-SHA256
over ``"<t>.<body>"`` with the project's ``webhook_secret`` (a receiver checks the time to refuse
replays); ``X-Controlplane-Event`` names the event (the payload's ``type``).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

from .models import Project, url_allowed

WEBHOOK_TIMEOUT_SECONDS = 5


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_seconds: int = 300) -> bool:
    """What a receiver does (and what our tests do)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def post_webhook(project: Project, url: str, payload: dict) -> str:
    """POST ``payload``; returns what happened ("200", "refused: not on the allowlist", "error: ...")."""
    if not url_allowed(url, project.webhook_allowlist):
        return "refused: not on the allowlist"
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "controlplane-webhooks/1",
        "X-Controlplane-Event": payload.get("type", ""),
        "X-Controlplane-Signature": sign(project.webhook_secret, body, int(time.time()))})
    try:
        with urllib.request.urlopen(req, timeout=WEBHOOK_TIMEOUT_SECONDS) as resp:  # noqa: S310 - allowlisted
            return str(resp.status)
    except urllib.error.HTTPError as exc:
        return f"error: HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        return f"error: {str(exc)[:150]}"
