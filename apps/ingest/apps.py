from django.apps import AppConfig


class IngestConfig(AppConfig):
    name = "apps.ingest"
    label = "ingest"
    verbose_name = "OTLP ingest"

    def ready(self) -> None:
        # The run log projects batches of these kinds through our decoders (no import upward).
        from apps.traces.services import register_decoder

        from . import decoders

        register_decoder("otlp.traces", decoders.decode_traces)
        register_decoder("otlp.logs", decoders.decode_logs)
