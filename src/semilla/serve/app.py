"""The FastAPI application: state, middleware, error handlers and routers, put together.

app = create_app(ServerSettings(), load_models(model_specs(["runs/demo"])))
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Response

from semilla import __version__
from semilla.serve import accounts, adapters, alerts, retrieval, switching, web
from semilla.serve.backends.base import Backend
from semilla.serve.backends.local import LocalBackend
from semilla.serve.backends.router import ModelRouter
from semilla.serve.engine import Engine
from semilla.serve.errors import install_error_handlers
from semilla.serve.hooks import ServerHooks
from semilla.serve.middleware import (
    AllowedHosts,
    BodySizeLimit,
    RequestGuard,
    RequestMetrics,
    UnexpectedErrors,
)
from semilla.serve.providers import ProvidersFile
from semilla.serve.registry import ServedModel
from semilla.serve.routes import (
    ab,
    anthropic,
    collections,
    compat,
    docs,
    embeddings,
    health,
    learn,
    lora,
    ollama,
    openai,
    responses,
    usage,
)
from semilla.serve.routes import models as model_admin
from semilla.serve.serving import ClientGone
from semilla.serve.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: settings, the engine, and the backends model names resolve to."""

    settings: ServerSettings
    engine: Engine
    models: dict[str, ServedModel] = field(default_factory=dict)  # the local checkpoints
    local: dict[str, LocalBackend] = field(default_factory=dict)  # their backends, by id
    started: float = field(default_factory=time.time)
    prompt_observers: list = field(default_factory=list)  # called with (model, prompt text) per request

    def __post_init__(self) -> None:
        self.router = ModelRouter(self.local)

    def add_model(self, served: ServedModel) -> None:
        lm = served.lm
        self.engine.add_model(served.id, lm.model, lm.tokenizer.pad_id)
        self.models[served.id] = served
        self.local[served.id] = LocalBackend(served, self.engine, self.prompt_observers)

    def remove_model(self, name: str) -> ServedModel:
        """Stop serving a local model; its requests in flight end with an error."""
        served = self.models.pop(name)
        del self.local[name]
        adapters.drop_adapters_of(self, name)
        self.engine.remove_model(name)
        return served

    def backend(self, name: str | None) -> Backend:
        """The backend a request's model names (see backends.router); 404 naming what is served."""
        return self.router.backend(name)

    def cards(self, admin: bool = False) -> list[dict]:
        """/v1/models: every name a request may use."""
        return self.router.cards(admin)

    @property
    def ready(self) -> bool:
        return bool(self.models or self.router.routes or self.router.upstreams) and self.engine.alive


def create_app(
    settings: ServerSettings | None = None,
    models: dict[str, ServedModel] | None = None,
    providers: ProvidersFile | None = None,
) -> FastAPI:
    """An app serving `models` (already loaded) with the engine settings of `settings`, and the
    providers and routes of `providers` (default: the file settings.providers names, whose
    checkpoints are loaded here)."""
    settings = settings or ServerSettings()
    engine = Engine(settings.max_slots, settings.queue_size, settings.request_timeout_s, settings.max_loras)
    state = ServerState(settings, engine)
    for served in (models or {}).values():
        state.add_model(served)
    if providers is None and settings.providers:
        providers = switching.read_providers(state)
    if providers is not None:
        switching.use_providers(state, providers)
    if settings.default_model:
        state.router.default = settings.default_model
    adapters.load_startup_adapters(state, settings.lora)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s on http://%s:%s", ", ".join(state.router.names()) or "no model", settings.host,
                 settings.port)  # fmt: skip
        grpc_server = None
        if settings.grpc_port is not None:  # the gRPC API on this event loop (serve/rpc)
            from semilla.serve.rpc.server import start_grpc

            grpc_server = await start_grpc(app, settings)
        yield
        if grpc_server is not None:
            from semilla.serve.rpc.server import stop_grpc

            await stop_grpc(app, grpc_server)
        engine.stop()
        for upstream in state.router.upstreams.values():
            await upstream.aclose()

    with_docs = docs.docs_enabled(settings)
    app = FastAPI(
        title="semilla",
        version=__version__,
        description="OpenAI-compatible API for models grown with semilla.",
        lifespan=lifespan,
        openapi_url="/openapi.json" if with_docs else None,
        docs_url=None,  # ours, with a CSP (routes/docs.py)
        redoc_url=None,
    )
    app.state.semilla = state
    app.state.settings = settings
    app.state.hooks = ServerHooks()
    app.state.responses = responses.StoredResponses()  # what previous_response_id continues
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc):  # nobody reads this; 499 as nginx logs it
        return Response(status_code=499)

    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(compat.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    if with_docs:
        docs.install(app)
    accounts.install(app, settings)  # store, auth, limits, cache, feedback: sets app.state.hooks
    state.router.redis = app.state.accounts.redis  # provider cooldowns shared by replicas (or None)
    retrieval.install(app, settings)  # embedding models and collections (in the accounts store)
    app.include_router(embeddings.router)
    app.include_router(collections.router)
    app.include_router(model_admin.router)
    app.include_router(ab.router)
    app.include_router(usage.router)
    lora.install(app, settings)  # vLLM's adapter routes, LoRA jobs (after accounts: they own conversations)
    app.include_router(learn.router)
    web.install(app, settings)  # chat, API keys and dashboard pages; the dashboard's stats sampler
    alerts.install(app, settings)  # alerting rules evaluated in-process, /admin/alerts, the webhook
    # outermost last: the size limit runs before anything reads the body
    app.add_middleware(RequestMetrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    def host_check() -> bool:
        """The Host check applies always when names are configured, else while anyone may use
        the models (DNS rebinding matters only where no credential is needed)."""
        return bool(settings.allowed_hosts) or app.state.hooks.serves_anonymous()

    allowed = AllowedHosts(settings.host, settings.allowed_hosts)
    app.add_middleware(RequestGuard, allowed=allowed, host_check=host_check)
    app.add_middleware(UnexpectedErrors)
    return app
