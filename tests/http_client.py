"""A tiny HTTP client on the standard library, for tests that talk to a real server over a socket."""
from __future__ import annotations

import urllib.error
import urllib.request


def request(method: str, url: str, *, headers: dict | None = None, data: bytes | None = None,
            timeout: float = 5) -> tuple[int | None, bytes, dict]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, b"", {}


def get(url: str, *, headers: dict | None = None, timeout: float = 5) -> tuple[int | None, bytes]:
    status, body, _ = request("GET", url, headers=headers, timeout=timeout)
    return status, body
