"""How a worker talks to a backend: one interface (``load``, ``unload``, ``run``) over a registered task
handler or an OpenAI-compatible server.

An OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI) loads a model itself: ``load`` asks it for
its models (``GET /models``: it answers once the model is ready) and ``unload`` is a no-op unless it is
Ollama's API, where a request with ``keep_alive: 0`` frees the model. ``run`` posts the task's input
(an OpenAI request body) to ``/chat/completions`` (chat) or ``/embeddings`` (embedding) and answers the
response's JSON; an image or custom task on an OpenAI backend posts to the path named by ``input.path``.
"""
from __future__ import annotations

from collections.abc import Callable

import httpx

from . import handlers
from .models import Backend

OPENAI_PATHS = {"chat": "/chat/completions", "embedding": "/embeddings", "image": "/images/generations"}
TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class BackendError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class HandlerClient:
    def __init__(self, backend: Backend):
        try:
            self.handler = handlers.get(backend.handler)
        except KeyError:
            raise BackendError("handler_missing", f"No handler {backend.handler!r} is registered here.") from None

    def load(self, model: str) -> None:
        self.handler.load(model)

    def unload(self, model: str) -> None:
        self.handler.unload(model)

    def run(self, kind: str, task_input: dict, model: str, should_stop: Callable[[], bool]) -> dict:
        return self.handler.run(task_input, model, should_stop)


class OpenAIClient:
    def __init__(self, backend: Backend):
        self.base = backend.url.rstrip("/")

    def load(self, model: str) -> None:
        try:
            with httpx.Client(timeout=TIMEOUT) as client:
                response = client.get(f"{self.base}/models")
        except httpx.HTTPError as exc:
            raise BackendError("backend_unreachable", f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise BackendError("backend_error", f"loading {model}: {response.status_code}: {response.text[:500]}")

    def unload(self, model: str) -> None:
        """Ollama frees a model on a request with keep_alive 0; other servers keep their one model."""
        root = self.base.removesuffix("/v1")
        try:
            with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
                client.post(f"{root}/api/generate", json={"model": model, "keep_alive": 0})
        except httpx.HTTPError:
            pass

    def run(self, kind: str, task_input: dict, model: str, should_stop: Callable[[], bool]) -> dict:
        path = OPENAI_PATHS.get(kind) or str(task_input.get("path") or "")
        if not path.startswith("/"):
            raise BackendError("invalid_input", "A custom task on an OpenAI backend names its input.path.")
        body = {k: v for k, v in task_input.items() if k != "path"}
        body["model"] = model
        try:
            with httpx.Client(timeout=TIMEOUT) as client:
                response = client.post(self.base + path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError("backend_unreachable", f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise BackendError("backend_error", f"{response.status_code}: {response.text[:500]}")
        try:
            return response.json()
        except ValueError:
            raise BackendError("backend_error", "The backend answered something other than JSON.") from None


def client_for(backend: Backend):
    return HandlerClient(backend) if backend.kind == Backend.Kind.HANDLER else OpenAIClient(backend)
