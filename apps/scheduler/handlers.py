"""Task handlers: what a ``handler`` backend runs (image generation, batch jobs, anything not served over
an OpenAI-compatible URL). A handler is registered by name; a backend names one (never a dotted path
from a form). ``SCHEDULER_HANDLER_MODULES`` lists modules imported at start-up that register more.

A handler has ``load(model)``, ``unload(model)`` and ``run(task_input, model, should_stop) -> dict``;
``should_stop()`` turns true when an operator cancels or redirects the running task (cooperative stop:
a handler checks it between steps and returns; ``Stopped`` is the polite way out).
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from django.conf import settings


class Stopped(Exception):
    """Raised by a handler that saw ``should_stop()``: the task ends cancelled (or moves, if redirected)."""


class Handler:
    def load(self, model: str) -> None:
        """Bring ``model`` into the device's memory."""

    def unload(self, model: str) -> None:
        """Free ``model``'s memory."""

    def run(self, task_input: dict, model: str, should_stop: Callable[[], bool]) -> dict:
        raise NotImplementedError


class Sleep(Handler):
    """Sleeps ``input.seconds`` (at most 3600), checking for a stop every 50 ms: the demo's GPU work and
    the queue's own tests (the GPU itself cannot run here)."""

    def run(self, task_input, model, should_stop):
        seconds = min(float(task_input.get("seconds", 0) or 0), 3600.0)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if should_stop():
                raise Stopped
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return {"slept": seconds, "model": model}


_registry: dict[str, Handler] = {"sleep": Sleep()}
_imported = False


def register(name: str, handler: Handler) -> None:
    _registry[name] = handler


def _import_modules() -> None:
    global _imported
    if not _imported:
        _imported = True
        for module in settings.SCHEDULER_HANDLER_MODULES:
            importlib.import_module(module)


def names() -> set[str]:
    _import_modules()
    return set(_registry)


def get(name: str) -> Handler:
    _import_modules()
    return _registry[name]
