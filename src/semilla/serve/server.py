"""`serve()`: load the models, build the app, run uvicorn. The function behind `semilla serve`."""

from __future__ import annotations

import logging
import os

import torch
import uvicorn

from semilla.checkpoint import resolve_checkpoint
from semilla.errors import SemillaError
from semilla.serve.accounts import StartupPolicyError, check_startup_policy
from semilla.serve.app import create_app
from semilla.serve.registry import discover, load_models, model_specs
from semilla.serve.settings import ServerSettings

log = logging.getLogger(__name__)


def resolve_model_specs(settings: ServerSettings, checkpoints: list[str], names: list[str] | None = None):
    """(id, path) of every model to serve: the checkpoints named, else $SEMILLA_MODELS /
    $BETA_MODEL_PATH, else whatever the models directory holds."""
    paths = list(checkpoints) or [p for p in settings.models.split(",") if p.strip()]
    if not paths:
        paths = discover(settings.models_dir)
    if not paths:
        raise SemillaError(
            f"no model to serve: name a checkpoint (semilla serve runs/mine) or put one in {settings.models_dir}/"
        )
    return model_specs(paths, names)


def serve(
    checkpoints: list[str], settings: ServerSettings | None = None, names: list[str] | None = None
) -> None:
    """Serve checkpoints over the OpenAI-compatible API until interrupted."""
    settings = settings or ServerSettings()
    specs = resolve_model_specs(settings, checkpoints, names)
    for _, path in specs:  # a wrong path is reported before anything else happens
        resolve_checkpoint(path)
    try:
        check_startup_policy(settings)
    except StartupPolicyError as e:
        raise SemillaError(str(e)) from None
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 2) - 1))
    models = load_models(specs, device=settings.device, dtype=settings.dtype)
    try:
        app = create_app(settings, models)
    except (ValueError, OSError) as e:  # e.g. a content filter file that is missing or invalid
        raise SemillaError(f"cannot start the server: {e}") from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
