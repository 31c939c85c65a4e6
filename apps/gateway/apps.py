from django.apps import AppConfig


class GatewayConfig(AppConfig):
    """The model gateway: an OpenAI-compatible boundary that reserves, forwards, traces and settles
    every model call (``app.py``); its only rows are each project's upstreams."""

    name = "apps.gateway"
    label = "gateway"
    verbose_name = "Model gateway"
