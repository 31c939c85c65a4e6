"""Readiness facts that higher apps add to ``/healthz`` without common importing them: each app
registers a function from its ``AppConfig.ready()``; its answer appears under its name."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_CHECKS: dict[str, Callable[[], Any]] = {}


def register(name: str, check: Callable[[], Any]) -> None:
    _CHECKS[name] = check


def report() -> dict[str, Any]:
    """Every registered fact; one that fails is reported as unknown (readiness is the database's ping)."""
    out: dict[str, Any] = {}
    for name, check in _CHECKS.items():
        try:
            out[name] = check()
        except Exception as exc:  # noqa: BLE001 - a fact we could not read does not make us unready
            logger.warning("health fact %s failed: %r", name, exc)
            out[name] = None
    return out
