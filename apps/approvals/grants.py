"""The grant a consume answers with: proof, for the gateway and the project's own tools, that one
approved action (its hash) may run now. Verified offline with the project's webhook secret; short-lived
(``APPROVALS_GRANT_SECONDS``). A grant is never taken as proof by this server: our own state is.

Format: ``cpg1.<payload>.<mac>``, ``payload`` the base64url (unpadded) of the JSON
``{"approval", "project", "action_hash", "iat", "exp"}``, ``mac`` the base64url of HMAC-SHA256 over
``"cpg1.<payload>"`` with the project's ``webhook_secret``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

PREFIX = "cpg1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed: str) -> str:
    return _b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())


def issue(*, secret: str, approval_id: str, project: str, action_hash: str, issued_at: int, ttl_seconds: int) -> str:
    payload = _b64(json.dumps({"approval": approval_id, "project": project, "action_hash": action_hash,
                               "iat": issued_at, "exp": issued_at + ttl_seconds},
                              separators=(",", ":"), sort_keys=True).encode())
    signed = f"{PREFIX}.{payload}"
    return f"{signed}.{_mac(secret, signed)}"


def verify(token: str, *, secret: str, action_hash: str | None = None, now: float | None = None) -> dict | None:
    """The grant's claims if its signature holds, it has not expired and (when given) it is for
    ``action_hash``; None otherwise. What a tool does before it runs an approved action."""
    try:
        prefix, payload, mac = token.split(".")
    except (AttributeError, ValueError):
        return None
    if prefix != PREFIX or not hmac.compare_digest(_mac(secret, f"{prefix}.{payload}"), mac):
        return None
    try:
        claims = json.loads(_unb64(payload))
        expires = int(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    if (now if now is not None else time.time()) >= expires:
        return None
    if action_hash is not None and not hmac.compare_digest(str(claims.get("action_hash", "")), action_hash):
        return None
    return claims
