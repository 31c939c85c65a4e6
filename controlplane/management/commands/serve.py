"""Serve the whole system from one process (the embedded mode behind ``make run``).

Daphne serves HTTP and WebSockets on the main thread. In embedded mode (no REDIS_URL) a real Celery
worker (solo pool) and Celery beat run on threads of the same process: the broker is an SQLite file
(Kombu's SQLAlchemy transport) and the channel layer is in-memory, which only reaches consumers of
the process that publishes; running everything in one process is what makes tasks' broadcasts reach
the browser. With Redis configured, run ``make web``, ``make worker`` and ``make beat`` instead.
Embedded mode also serves OTLP/gRPC on OTLP_GRPC_PORT (4317). Ctrl-C (SIGINT) or SIGTERM stops Daphne,
then the worker and beat, then the process.

This is the composition root: it wires the ASGI application, the Celery app and ingest's gRPC server
together, so it lives in ``controlplane`` (above every app), not in an app (STYLE.md §1, §10).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

logger = logging.getLogger("controlplane.serve")


class Command(BaseCommand):
    help = "Serve HTTP + WebSockets with Daphne; in embedded mode also run a Celery worker and beat in-process."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument("--no-worker", action="store_true", help="do not start the in-process worker/beat")

    def handle(self, *args, host: str, port: int, no_worker: bool, **options):
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server

        worker = beat = grpc_server = None
        if settings.EMBEDDED and not no_worker:
            worker, beat = self._start_worker_and_beat()
        if settings.EMBEDDED and settings.OTLP_GRPC_PORT:
            grpc_server = self._start_grpc(host)

        from controlplane.asgi import application

        self.stdout.write(f"controlplane serving on http://{host}:{port}/ "
                          f"({'embedded: SQLite, in-process worker and beat' if settings.EMBEDDED else 'Redis'})")
        self.stdout.flush()
        server = Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            signal_handlers=False,  # ours below: Twisted skips SIGINT when it was inherited as ignored
            verbosity=1,
            action_logger=None,
        )
        from twisted.internet import reactor

        from apps.common import live

        # Worker threads publish through Daphne's loop (the in-memory layer is not thread-safe).
        reactor.callWhenRunning(lambda: live.bind_loop(asyncio.get_event_loop()))

        def stop(signum, frame):
            logger.info("signal %s: shutting down", signum)
            reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            server.run()
        finally:
            self.stdout.write("stopping worker and beat...")
            if grpc_server is not None:
                grpc_server.stop(grace=2).wait()
            if beat is not None:
                beat.stop()
            if worker is not None:
                worker.stop(in_sighandler=False, exitcode=0)
            self.stdout.write("stopped.")

    def _start_grpc(self, host: str):
        """The OTLP/gRPC receiver on its own threads (production runs ``manage.py otlp_grpc``)."""
        from apps.ingest.grpc_server import build_server

        try:
            server, port = build_server(host=host)
        except (OSError, RuntimeError) as exc:
            logger.warning("OTLP/gRPC not served (%s); OTLP/HTTP is unaffected", exc)
            return None
        server.start()
        self.stdout.write(f"OTLP/gRPC on {host}:{port}")
        return server

    def _start_worker_and_beat(self):
        from celery.beat import EmbeddedService

        from apps.scheduler.management.commands.scheduler_queues import local_queues
        from controlplane.celery import app

        worker = app.WorkController(
            hostname=f"embedded@{socket.gethostname()}",
            pool_cls="solo",
            concurrency=1,
            loglevel="INFO",
            queues=settings.CELERY_EMBEDDED_QUEUES + local_queues(),  # and this machine's GPUs' queues
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
        )
        threading.Thread(target=worker.start, name="celery-worker", daemon=True).start()
        beat = EmbeddedService(app, thread=True, scheduler_cls=settings.CELERY_BEAT_SCHEDULER)
        beat.start()
        return worker, beat
