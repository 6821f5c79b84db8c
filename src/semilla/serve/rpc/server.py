"""The gRPC server of `semilla serve --grpc-port`: the Semilla service and the standard health
service (grpc.health.v1), on the event loop of the HTTP server, so both share one engine, one
set of accounts and limits, and one Prometheus registry.

    server = await start_grpc(app, settings)   # in the app's lifespan, after the engine starts
    ...
    await stop_grpc(server)
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from semilla.serve.rpc import SERVICE
from semilla.serve.settings import ServerSettings

log = logging.getLogger(__name__)
GRACE_S = 5.0  # calls in flight get this long to finish when the server stops


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """A message over the HTTP body limit is refused (RESOURCE_EXHAUSTED) before it is read, and
    the port is this process's alone (gRPC would otherwise let a second server share it)."""
    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 0),
    ]


async def start_grpc(app, settings: ServerSettings) -> grpc.aio.Server:
    """Serve the gRPC API on settings.host:settings.grpc_port (0: any free port); the port
    bound is app.state.grpc_port."""
    from semilla.serve.rpc.service import SemillaService, services

    server = grpc.aio.server(options=grpc_options(settings))
    services.add_SemillaServicer_to_server(SemillaService(app), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    for name in ("", SERVICE):  # "": the server as a whole
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    app.state.grpc_port, app.state.grpc_health = port, checks
    log.info("serving gRPC (%s) on %s:%s", SERVICE, settings.host, port)
    return server


async def stop_grpc(app, server: grpc.aio.Server) -> None:
    """Say NOT_SERVING to health checks, then stop, letting calls in flight finish."""
    await app.state.grpc_health.enter_graceful_shutdown()
    await server.stop(GRACE_S)
