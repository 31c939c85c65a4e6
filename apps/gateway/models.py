"""A project's upstreams: the OpenAI-compatible servers its model calls are forwarded to, by model
name, in priority order (the next one is the fallback). Credentials are never stored: an upstream
names the environment variable that holds its key."""
from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from apps.projects.models import ProjectOwnedQuerySet

ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,99}$")


class Upstream(models.Model):
    project = models.ForeignKey("projects.Project", on_delete=models.CASCADE, related_name="upstreams")
    name = models.CharField(max_length=100)
    base_url = models.URLField(max_length=500, help_text="The API's base, e.g. https://api.openai.com/v1 or "
                                                         "http://127.0.0.1:8000/v1 (vLLM, Ollama, llama.cpp).")
    provider = models.CharField(max_length=100, blank=True,
                                help_text="How its calls are priced (openai, anthropic, ...); empty: unpriced "
                                          "unless a price override names the model.")
    api_key_env = models.CharField(max_length=100, blank=True,
                                   help_text="The environment variable holding its API key (never stored here).")
    model_names = models.JSONField(default=list, help_text='The model names it serves, globs allowed: ["gpt-4o*"].')
    priority = models.SmallIntegerField(default=100, help_text="Lower first; the next one serving the model is "
                                                               "the fallback.")
    timeout_seconds = models.FloatField(default=60, validators=[MinValueValidator(0.1), MaxValueValidator(3600)])
    max_output_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="What a call without max_tokens is held for (else the model's context "
                                         "window from the price database).")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ProjectOwnedQuerySet.as_manager()

    FIELDS = ("name", "base_url", "provider", "api_key_env", "model_names", "priority", "timeout_seconds",
              "max_output_tokens", "enabled")

    class Meta:
        ordering = ["project", "priority", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="gateway_upstream_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.base_url})"

    def clean(self) -> None:
        errors = {}
        if self.api_key_env and not ENV_NAME_RE.fullmatch(self.api_key_env):
            errors["api_key_env"] = "An environment variable's name: capitals, digits and _."
        names = self.model_names
        if (not isinstance(names, list) or not names or len(names) > 100
                or not all(isinstance(m, str) and 0 < len(m) <= 200 for m in names)):
            errors["model_names"] = "A list of 1 to 100 model names or globs."
        if self.base_url and not self.base_url.lower().startswith(("http://", "https://")):
            errors["base_url"] = "An http(s) URL."
        if errors:
            raise ValidationError(errors)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}
