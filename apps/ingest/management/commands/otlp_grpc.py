"""Serve OTLP/gRPC (traces and logs) on its own port: ``python manage.py otlp_grpc``."""
from __future__ import annotations

import os
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.ingest.grpc_server import build_server


class Command(BaseCommand):
    help = "Serve the OTLP/gRPC receiver (TraceService and LogsService Export) on OTLP_GRPC_PORT (4317)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("OTLP_GRPC_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.OTLP_GRPC_PORT or 4317)
        parser.add_argument("--workers", type=int, default=settings.OTLP_GRPC_WORKERS)

    def handle(self, *args, host: str, port: int, workers: int, **options):
        try:
            server, bound = build_server(host=host, port=port, workers=workers)
        except (OSError, RuntimeError) as exc:
            raise CommandError(str(exc)) from None
        stopped = threading.Event()

        def stop(signum, frame):
            stopped.set()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        server.start()
        self.stdout.write(f"OTLP/gRPC receiver listening on {host}:{bound}")
        self.stdout.flush()
        stopped.wait()
        self.stdout.write("stopping (5 s grace for calls in flight)...")
        server.stop(grace=5).wait()
        self.stdout.write("stopped.")
