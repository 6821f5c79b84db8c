"""Runtime switching, for admins: load and unload local checkpoints, choose the default model,
reload the providers file, all without a restart. The admin routes (routes/models.py) call
these; the blocking ones (loading weights) run in a worker thread.
"""

from __future__ import annotations

import logging

from semilla.errors import SemillaError
from semilla.serve.backends.remote import Upstream
from semilla.serve.errors import APIError
from semilla.serve.providers import NAME, ProvidersFile, load_providers
from semilla.serve.registry import ServedModel, load_models

log = logging.getLogger(__name__)


def read_providers(state) -> ProvidersFile:
    """The settings' providers file, checked against the models served besides its own."""
    own = {p.name for p in state.router.file.providers.values() if not p.remote}
    return load_providers(state.settings.providers, [name for name in state.local if name not in own])


def use_providers(state, file: ProvidersFile) -> tuple[list[str], list[str], list[Upstream]]:
    """Serve `file`'s checkpoints (loading the new ones, unloading those it dropped) and route
    by it from now on. Returns (loaded, unloaded, the upstreams it replaced: to be closed)."""
    before = {p.name for p in state.router.file.providers.values() if not p.remote}
    wanted = dict(file.checkpoints())
    missing = [(name, path) for name, path in wanted.items() if name not in state.models]
    for served in _load(state, missing).values():
        state.add_model(served)
    dropped = sorted(before - set(wanted))
    for name in dropped:
        state.remove_model(name)
    replaced = state.router.configure(file)
    state.router.default = state.settings.default_model or file.default
    return [name for name, _ in missing], dropped, replaced


def _load(state, specs: list[tuple[str, str]]) -> dict[str, ServedModel]:
    return load_models(specs, device=state.settings.device, dtype=state.settings.dtype)


def load_checkpoint(state, name: str, path: str) -> ServedModel:
    """Load a checkpoint and serve it as `name` (blocking: run it in a thread)."""
    if not NAME.match(name):
        raise APIError(400, f"model name {name!r} must be letters, digits, '.', '_' or '-'", param="name")
    if name in state.router.names() or name in state.router.upstreams:
        raise APIError(
            409, f"{name!r} is already a model, route or provider name", param="name", code="conflict"
        )
    try:
        served = _load(state, [(name, path)])[name]
    except (SemillaError, OSError, ValueError) as e:  # ValueError: a path no file system takes (NUL)
        raise APIError(400, f"cannot load {path!r}: {e}", param="path", code="invalid_checkpoint") from None
    state.add_model(served)
    log.info("loaded %s from %s", name, path)
    return served


def unload(state, name: str) -> None:
    if name not in state.models:
        known = ", ".join(state.models) or "none"
        raise APIError(
            404, f"no local model {name!r} (loaded: {known})", param="name", code="model_not_found"
        )
    state.remove_model(name)
    log.info("unloaded %s", name)


def set_default(state, name: str) -> str:
    """Make `name` the model of requests that name none (404 when nothing answers to it)."""
    state.backend(name)
    state.router.default = name
    return name


async def reload_providers(state) -> dict:
    """Re-read the providers file; a bad file is a 400 and the running set-up stays."""
    from starlette.concurrency import run_in_threadpool

    if not state.settings.providers:
        raise APIError(
            409, "this server has no providers file (semilla serve --providers FILE)", code="conflict"
        )
    try:
        file = await run_in_threadpool(read_providers, state)
        loaded, unloaded, replaced = await run_in_threadpool(use_providers, state, file)
    except SemillaError as e:
        raise APIError(400, str(e), code="invalid_providers_file") from None
    for upstream in replaced:
        await upstream.aclose()
    return {
        "reloaded": True,
        "loaded": loaded,
        "unloaded": unloaded,
        "routes": list(file.routes),
        "providers": list(file.providers),
        "default": state.router.default or None,
    }
