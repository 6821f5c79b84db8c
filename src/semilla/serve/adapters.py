"""LoRA adapters served by name: `semilla serve --lora NAME=PATH`, and vLLM's admin-only
/v1/load_lora_adapter and /v1/unload_lora_adapter at run time (routes/lora.py calls these).

An adapter is a name in the router like a model's (`state.local`), answered by an
`AdapterBackend` on its base model's engine worker, whose bank keeps at most
`--max-loras` adapters in memory (the least recently used idle one leaves first, and is read
again from its directory when asked for).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from semilla.errors import SemillaError
from semilla.models.adapter_bank import AdaptersBusyError, UnknownAdapterError
from semilla.models.lora import AdapterError, read_adapter_config
from semilla.serve.backends.adapter import AdapterBackend
from semilla.serve.errors import APIError
from semilla.serve.providers import NAME

log = logging.getLogger(__name__)


def adapter_specs(raw: str) -> list[tuple[str, str]]:
    """(name, path) of each NAME=PATH in a comma-separated list (--lora, $SEMILLA_LORA)."""
    specs = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SemillaError(f"--lora {item!r}: write it NAME=PATH (a PEFT adapter directory)")
        specs.append((name.strip(), path.strip()))
    return specs


def check_adapter_specs(raw: str) -> list[tuple[str, str]]:
    """The specs of --lora, each an adapter directory with a readable adapter_config.json
    (checked before a model loads; whether it fits its base is checked when it is loaded)."""
    specs = adapter_specs(raw)
    for name, path in specs:
        try:
            if not Path(path).is_dir():
                raise AdapterError(f"{path} is not a directory")
            read_adapter_config(path)
        except (AdapterError, OSError) as e:
            raise SemillaError(f"--lora {name}={path}: {' '.join(str(e).split())}") from None
    return specs


def base_of(state, base: str | None) -> str:
    """The served checkpoint an adapter attaches to: `base`, else the default model (when it is
    a checkpoint), else the first one."""
    if base is None:
        default = state.router.default
        base = default if default in state.models else next(iter(state.models), None)
        if base is None:
            raise APIError(400, "no local model is served to put an adapter on", param="base_model_name")
    if base not in state.models:
        raise APIError(
            404, f"no local model {base!r} (loaded: {', '.join(state.models) or 'none'})",
            param="base_model_name", code="model_not_found",
        )  # fmt: skip
    return base


def load_adapter(state, name: str, path: str, base: str | None = None) -> AdapterBackend:
    """Serve the PEFT adapter directory `path` as model `name` on `base` (checked now: an
    adapter for another base, or a broken one, is a 400 and nothing is registered)."""
    if not NAME.match(name):
        raise APIError(
            400, f"adapter name {name!r} must be letters, digits, '.', '_' or '-'", param="lora_name"
        )
    if name in state.router.names() or name in state.router.upstreams:
        raise APIError(
            409, f"{name!r} is already a model, adapter, route or provider name", param="lora_name",
            code="conflict",
        )  # fmt: skip
    base = base_of(state, base)
    directory = Path(path)
    try:
        if not directory.is_dir():
            raise AdapterError(f"{path} is not a directory")
        state.engine.add_adapter(base, name, directory)
    except AdaptersBusyError as e:
        raise APIError(429, str(e), code="adapters_busy", headers={"Retry-After": "1"}) from None
    except (AdapterError, OSError, ValueError) as e:  # ValueError: a path no file system takes (NUL)
        message = " ".join(str(e).split())  # one line, whatever the reader said
        raise APIError(400, f"cannot load adapter {name!r}: {message}", param="lora_path",
                       code="invalid_adapter") from None  # fmt: skip
    backend = AdapterBackend(name, str(directory), state.local[base])
    state.local[name] = backend
    log.info("loaded adapter %s on %s from %s", name, base, path)
    return backend


def unload_adapter(state, name: str) -> None:
    """Stop serving adapter `name`: new requests get 404; rows using it finish with it."""
    backend = state.local.get(name)
    if not isinstance(backend, AdapterBackend):
        raise APIError(404, f"no LoRA adapter {name!r} (loaded: {', '.join(adapter_names(state)) or 'none'})",
                       param="lora_name", code="model_not_found")  # fmt: skip
    with contextlib.suppress(UnknownAdapterError, KeyError):  # its base was unloaded meanwhile
        state.engine.remove_adapter(backend.parent, name)
    del state.local[name]
    log.info("unloaded adapter %s", name)


def adapter_names(state) -> list[str]:
    return [name for name, b in list(state.local.items()) if isinstance(b, AdapterBackend)]


def drop_adapters_of(state, base: str) -> None:
    """Forget the adapters of base model `base` (being unloaded: its engine worker goes too)."""
    for name in [
        n for n, b in list(state.local.items()) if isinstance(b, AdapterBackend) and b.parent == base
    ]:
        del state.local[name]


def load_startup_adapters(state, raw: str) -> None:
    """The adapters of --lora / $SEMILLA_LORA; a bad one stops the start with one line."""
    for name, path in adapter_specs(raw):
        try:
            load_adapter(state, name, path)
        except APIError as e:
            raise SemillaError(f"--lora {name}={path}: {e.message}") from None
