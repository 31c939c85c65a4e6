"""A small per-process cache of values read from the database, each kept for a few seconds (a
setting's value, read when used so that tests and deployments can change it). For what sits on a
per-call path and changes rarely: API keys at the gateway, a project's budgets, its prices. A change
made in this process forgets the entry at once (``forget``); other processes see it within the TTL."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from django.conf import settings

V = TypeVar("V")


class TTLCache(Generic[V]):
    instances: list[TTLCache] = []

    def __init__(self, setting: str, max_entries: int = 10_000) -> None:
        TTLCache.instances.append(self)
        self.setting = setting
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[Hashable, tuple[float, V]] = {}

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        ttl = getattr(settings, self.setting)
        now = time.monotonic()
        found = self._entries.get(key)
        if found is not None and now - found[0] < ttl:
            return found[1]
        value = load()
        if ttl > 0:
            with self._lock:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[key] = (now, value)
        return value

    def forget(self, key: Hashable | None = None) -> None:
        with self._lock:
            if key is None:
                self._entries.clear()
            else:
                self._entries.pop(key, None)


def forget_all() -> None:
    """Every cache of the process emptied (tests start from the database's state)."""
    for cache in TTLCache.instances:
        cache.forget()
