"""`serve()`: load the models, build the app, run uvicorn. The function behind `semilla serve`.

The listening socket is bound before anything else is done or printed, so a bad or busy port
is one clear error; uvicorn is then handed that socket, configured as `http_config` says.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from semilla.checkpoint import resolve_checkpoint
from semilla.errors import SemillaError
from semilla.serve import alerts, retrieval
from semilla.serve.accounts import StartupPolicyError, check_startup_policy
from semilla.serve.adapters import check_adapter_specs
from semilla.serve.app import create_app
from semilla.serve.providers import load_providers
from semilla.serve.registry import discover, load_models, model_specs
from semilla.serve.settings import ServerSettings

log = logging.getLogger(__name__)


def resolve_model_specs(settings: ServerSettings, checkpoints: list[str], names: list[str] | None = None):
    """(id, path) of every model to serve: the checkpoints named, else $SEMILLA_MODELS /
    $BETA_MODEL_PATH, else whatever the models directory holds (none is needed with a
    providers file)."""
    paths = list(checkpoints) or [p for p in settings.models.split(",") if p.strip()]
    if not paths:
        paths = discover(settings.models_dir)
    if not paths and not settings.providers:
        raise SemillaError(
            f"no model to serve: name a checkpoint (semilla serve runs/mine) or put one in {settings.models_dir}/"
        )
    return model_specs(paths, names)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn starts listening on it); a SemillaError naming
    the address when the port is taken or the host cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for sockets made
    # with it; without, a kept-alive connection waited ~40 ms for each answer's body (Nagle
    # holding it until the client acknowledged the headers, which it delays)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse TIME_WAIT ports
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        reason = (
            "the port is in use by another program" if getattr(e, "errno", None) == errno.EADDRINUSE else e
        )
        raise SemillaError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def check_grpc(settings: ServerSettings) -> None:
    """--grpc-port: a SemillaError now, before the models load, when the gRPC packages are
    missing or the port cannot be bound."""
    try:
        import grpc_health  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError:
        raise SemillaError("--grpc-port needs the gRPC packages: pip install 'semilla[grpc]'") from None
    if settings.grpc_port:
        bind_socket(settings.host, settings.grpc_port).close()


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: a client that
    sends them a byte at a time (slowloris) is disconnected instead of holding a connection."""

    class HeaderTimeoutProtocol(H11Protocol):
        _headers_due: object = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            self._headers_due = self.loop.call_later(timeout_s, self._check_headers)

        def _check_headers(self) -> None:
            # IDLE: the next request's headers are still not complete (or never began)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def http_config(app, settings: ServerSettings, **overrides) -> uvicorn.Config:
    """How uvicorn runs `app`: h11 with a header deadline, and forwarded headers believed only
    from the proxies named in --forwarded-allow-ips (none by default)."""
    trusted = [ip.strip() for ip in settings.forwarded_allow_ips.split(",") if ip.strip()]
    options = dict(
        host=settings.host,
        port=settings.port,
        http=header_timeout_protocol(settings.header_timeout_s),
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        log_level="info",
        access_log=False,
    )
    return uvicorn.Config(app, **(options | overrides))


def serve(
    checkpoints: list[str], settings: ServerSettings | None = None, names: list[str] | None = None
) -> None:
    """Serve checkpoints, and the providers and routes of settings.providers, over the
    OpenAI-compatible API until interrupted."""
    settings = settings or ServerSettings()
    specs = resolve_model_specs(settings, checkpoints, names)
    for _, path in specs:  # a wrong path is reported before anything else happens
        resolve_checkpoint(path)
    check_adapter_specs(settings.lora)
    providers = (
        load_providers(settings.providers, [name for name, _ in specs]) if settings.providers else None
    )
    alerts.check_settings(settings)  # a bad rules file or webhook URL: one line, before any loading
    sock = bind_socket(settings.host, settings.port)
    if settings.grpc_port is not None:
        check_grpc(settings)
    try:
        check_startup_policy(settings)
    except StartupPolicyError as e:
        raise SemillaError(str(e)) from None
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 2) - 1))
    imports = retrieval.start_imports()  # while the models load
    specs += providers.checkpoints() if providers else []
    models = load_models(specs, device=settings.device, dtype=settings.dtype)
    try:
        app = create_app(settings, models, providers)
    except (ValueError, OSError) as e:  # e.g. a content filter file that is missing or invalid
        raise SemillaError(f"cannot start the server: {e}") from None
    imports.join()
    # What is loaded by now (torch, the models, the app, the retrieval libraries: ~600k objects)
    # lives as long as the server. Frozen out of the collector's sight, so its full passes under
    # load scan only what requests create: a pass over all of it stalled every request, /health
    # too, for 0.2-0.6 s.
    gc.collect()
    gc.freeze()
    uvicorn.Server(http_config(app, settings)).run(sockets=[sock])
