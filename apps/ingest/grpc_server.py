"""The OTLP/gRPC receiver: ``TraceService/Export`` and ``LogsService/Export`` on their own port (4317).

Same pipeline as OTLP/HTTP (``services``): the key from the ``authorization: Bearer <key>`` or
``x-api-key`` metadata, then rate, backlog, validation and the durable accept. The request bytes are
taken as they arrived (no deserialise-serialise round trip) and parsed by the same code as HTTP.

Status codes follow the OTLP specification: a refused key is UNAUTHENTICATED / PERMISSION_DENIED, a
malformed request INVALID_ARGUMENT, an overloaded or unreachable store UNAVAILABLE and a key over its
rate RESOURCE_EXHAUSTED, both with a ``google.rpc.RetryInfo`` in the status details, which is what
tells exporters to retry and how long to wait. Each call runs on a pool thread with Django's
connection handling around it, as a request would.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from . import otlp, services
from .services import Refusal
from .views import store_unavailable

logger = logging.getLogger(__name__)

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
LOGS_SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"


def _key(metadata) -> str | None:
    values = {k.lower(): v for k, v in metadata}
    header = values.get("authorization", "")
    if isinstance(header, str) and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return values.get("x-api-key") or None


def _abort(context: grpc.ServicerContext, refusal: Refusal):
    code = grpc.StatusCode[refusal.grpc]
    status = status_pb2.Status(code=code.value[0], message=refusal.message)
    if refusal.retry_after is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=refusal.retry_after)))
        status.details.append(detail)
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),
                                   ("x-error-code", str(refusal.error_code))))
    context.abort(code, refusal.message)


def _handler(accept, respond):
    def export(body: bytes, context: grpc.ServicerContext):
        close_old_connections()
        try:
            key = services.admit(_key(context.invocation_metadata()))
            rejected, message = accept(key, body, otlp.PROTOBUF, source="otlp-grpc") if body else (0, "")
            return respond(rejected, message)
        except Refusal as refusal:
            _abort(context, refusal)
        except (OperationalError, InterfaceError) as exc:
            logger.warning("OTLP gRPC receiver: database unavailable: %s", exc)
            _abort(context, store_unavailable())
        finally:
            close_old_connections()

    # No request deserializer: the handler gets the bytes as sent, parsed once by the shared code.
    return grpc.unary_unary_rpc_method_handler(export, response_serializer=lambda m: m.SerializeToString())


def build_server(*, host: str = "127.0.0.1", port: int | None = None, workers: int | None = None
                 ) -> tuple[grpc.Server, int]:
    """A started-but-not-yet-serving gRPC server and the port it bound (``port=0``: any free one)."""
    port = settings.OTLP_GRPC_PORT if port is None else port
    limit = services.max_body_bytes()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers or settings.OTLP_GRPC_WORKERS,
                                   thread_name_prefix="otlp-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 1024 * 1024),
                 ("grpc.so_reuseport", 0)],  # a port in use is an error, not a silently shared port
    )
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(TRACE_SERVICE, {
            "Export": _handler(services.accept_traces, otlp.traces_response)}),
        grpc.method_handlers_generic_handler(LOGS_SERVICE, {
            "Export": _handler(services.accept_logs, otlp.logs_response)}),
    ))
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} for OTLP/gRPC")
    return server, bound
