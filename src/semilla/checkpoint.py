"""Checkpoint directories: save atomically, load safely (safetensors and JSON, never pickle).

config.json             {"semilla_version", "format_version", "model": {...}, "train": {...}}
model.safetensors       weights, Hugging Face names
tokenizer.json, tokenizer_config.json
trainer_state.json      resumable runs: step, RNG and data-sampler state, scheduler
optimizer.safetensors   resumable runs: AdamW moments keyed "{param_name}/{state_key}"
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from semilla import __version__
from semilla.atomic import atomic_directory, existing_dir
from semilla.config import DTYPES, ModelConfig, TrainConfig, model_config_from_dict
from semilla.errors import CheckpointError, ConfigError
from semilla.models import build_model
from semilla.models.int8 import apply_int8, split_int8_state
from semilla.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when a checkpoint written by this version cannot be read by older ones
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    tokenizer: Tokenizer,
    train_config: TrainConfig | None = None,
    trainer_state: dict[str, Any] | None = None,
    optimizer_state: OptimizerState | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; the previous one survives any failure.

    optimizer_state (see optimizer_state_by_name) makes the checkpoint resumable; `weights`
    (a whole state dict) stand in for `model`'s own when the model is sharded over processes."""
    cfg: ModelConfig = model.config
    try:
        with atomic_directory(directory) as tmp:
            config = {
                "semilla_version": __version__,
                "format_version": FORMAT_VERSION,
                "model": asdict(cfg),
                "train": asdict(train_config) if train_config else None,
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            _save_tensors(model_state(model, weights), tmp / "model.safetensors", {"format": "pt"})
            tokenizer.save(tmp)
            if trainer_state is not None:
                (tmp / "trainer_state.json").write_text(
                    json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8"
                )
            if optimizer_state is not None:
                write_optimizer_tensors(tmp, optimizer_state)
    except OSError as e:  # disk full, permission denied: name the checkpoint, not the temp dir
        reason = e.strerror or str(e)
        raise OSError(
            e.errno,
            f"cannot save checkpoint: {reason} (an earlier one there is untouched)",
            str(directory),
        ) from e
    return Path(directory)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors reports I/O failures (disk full, ...) as SafetensorError; make them OSError."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def model_state(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights to save (`model`'s, or `weights`): contiguous CPU copies; a tied head is left
    out, as Hugging Face does."""
    weights = model.state_dict() if weights is None else weights
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


OPTIMIZER_FORMAT = "semilla-optimizer-by-name/1"


class OptimizerState(NamedTuple):
    """Optimizer state keyed by parameter name, so it survives a change of the model's shape.

    state: {param_name: {state_key: value}}, e.g. {"model.norm.weight": {"exp_avg": T,
    "exp_avg_sq": T, "step": T}}; param_groups: the optimizer's groups (lr, betas, ...) with
    parameter names in "params" instead of positions.
    """

    state: dict[str, dict[str, Any]]
    param_groups: list[dict[str, Any]]


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> OptimizerState:
    """The optimizer's state with every parameter position replaced by its name in `model`."""
    names = {id(p): name for name, p in model.named_parameters()}
    by_position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()
    return OptimizerState(
        {by_position[i]: dict(values) for i, values in sd["state"].items()},
        [{**g, "params": [by_position[i] for i in g["params"]]} for g in sd["param_groups"]],
    )


def write_optimizer_tensors(directory: str | os.PathLike, optimizer_state: OptimizerState) -> None:
    """Write `optimizer.safetensors`: tensors keyed "{param_name}/{state_key}"; the format, the
    param groups and any non-tensor state in one JSON metadata entry, "layout" (one entry, as
    safetensors stores metadata unordered and a resumed run must write the same bytes).
    The inverse of read_optimizer_tensors."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in optimizer_state.state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    layout = {"format": OPTIMIZER_FORMAT, "param_groups": optimizer_state.param_groups, "scalars": scalars}
    _save_tensors(tensors, Path(directory) / "optimizer.safetensors", {"layout": json.dumps(layout)})


def _read_optimizer_file(
    directory: str | os.PathLike,
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(path, layout, tensors) of a checkpoint's optimizer.safetensors."""
    path = Path(directory) / "optimizer.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no optimizer.safetensors; it cannot be resumed")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            layout = json.loads((f.metadata() or {})["layout"])
        return path, layout, load_file(str(path))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def read_optimizer_tensors(directory: str | os.PathLike) -> OptimizerState:
    """The optimizer state of a checkpoint directory, keyed by parameter name."""
    return _state_by_name(*_read_optimizer_file(directory))


def _state_by_name(path: Path, layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> OptimizerState:
    if layout.get("format") != OPTIMIZER_FORMAT:
        raise CheckpointError(
            f"{path} keys the optimizer state by position (an older semilla): "
            "resume the run once with this version to rewrite it by parameter name"
        )
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, state_key = key.rsplit("/", 1)
        state.setdefault(name, {})[state_key] = value
    for name, values in layout["scalars"].items():
        state.setdefault(name, {}).update(values)
    return OptimizerState(state, layout["param_groups"])


def _state_dict_from_names(
    saved: OptimizerState, optimizer: torch.optim.Optimizer, model: nn.Module, path: Path
) -> dict[str, Any]:
    """A torch optimizer state_dict for `optimizer`, matching saved state to parameters by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    if len(saved.param_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path} has {len(saved.param_groups)} parameter groups, this optimizer "
            f"{len(optimizer.param_groups)}"
        )
    state: dict[int, dict[str, Any]] = {}
    groups = []
    position = 0
    for saved_group, group in zip(saved.param_groups, optimizer.param_groups, strict=True):
        wanted = [names[id(p)] for p in group["params"]]
        missing = sorted(set(wanted) - set(saved_group["params"]))
        unexpected = sorted(set(saved_group["params"]) - set(wanted))
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        start = position
        for name, param in zip(wanted, group["params"], strict=True):
            values = saved.state.get(name)
            if values:
                for key, value in values.items():
                    if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                        raise CheckpointError(
                            f"{path}: {name}/{key} has shape {tuple(value.shape)}, "
                            f"the parameter {tuple(param.shape)}"
                        )
                state[position] = values
            position += 1
        groups.append({**saved_group, "params": list(range(start, position))})
    return {"state": state, "param_groups": groups}


def _state_dict_from_positions(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    """The older layout: tensors keyed "{position}.{state_key}" (same model shape only)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in layout["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}


def load_optimizer_state(
    directory: str | os.PathLike, optimizer: torch.optim.Optimizer, model: nn.Module
) -> None:
    """Restore `optimizer` (whose parameters belong to `model`) from a checkpoint directory,
    by parameter name (or by position, from files of older semilla versions)."""
    path, layout, tensors = _read_optimizer_file(directory)
    if layout.get("format") == OPTIMIZER_FORMAT:
        sd = _state_dict_from_names(_state_by_name(path, layout, tensors), optimizer, model, path)
    else:
        try:
            sd = _state_dict_from_positions(tensors, layout)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: {e!r}") from e
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this model: {e}") from e


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint directory itself, or inside a run directory `best/` (or `last/`)."""
    p = existing_dir(path) or Path(path)  # a crash mid-swap leaves the previous one as .NAME.old
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (p / "config.json").is_file():
        return p
    order = ("best", "last") if prefer == "best" else ("last", "best")
    for name in order:
        found = existing_dir(p / name)
        if found is not None and (found / "config.json").is_file():
            return found
    raise CheckpointError(f"{p} is not a checkpoint: it has no config.json (nor best/ or last/)")


def read_config(directory: Path) -> dict[str, Any]:
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{directory / 'config.json'} has no model section")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {directory} was written by semilla {config.get('semilla_version', '?')} "
            f"(format {version}); this semilla {__version__} reads format {FORMAT_VERSION} or older: upgrade semilla"
        )
    return config


def infer_shapes(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """Take every shape the weights pin down from the weights, not from config.json."""
    changes: dict[str, Any] = {}
    emb = tensors.get("model.embed_tokens.weight", tensors.get("embed_tokens.weight"))
    if emb is not None:
        changes["vocab_size"], changes["n_embd"] = emb.shape
    if "model.embed_positions.weight" in tensors:
        changes["block_size"] = tensors["model.embed_positions.weight"].shape[0]
    layer_ids = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
    if layer_ids:
        changes["n_layer"] = max(layer_ids) + 1
    up = tensors.get("model.layers.0.mlp.up_proj.weight")
    if up is not None:
        changes["intermediate_size"] = up.shape[0]
    k = tensors.get("model.layers.0.self_attn.k_proj.weight")
    if k is not None and cfg.n_head and emb is not None:
        head_dim = emb.shape[1] // cfg.n_head
        if head_dim and k.shape[0] % head_dim == 0:
            changes["n_kv_head"] = k.shape[0] // head_dim
    return ModelConfig(**{**asdict(cfg), **changes})


def weight_shapes(directory: Path) -> dict[str, torch.Tensor]:
    """The weights as empty meta tensors: shapes from the safetensors header, no data read."""
    from safetensors import safe_open

    path = directory / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); use an earlier checkpoint") from e


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / "model.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); use an earlier checkpoint") from e


def inference_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The dtype weights are held in for inference. auto: bfloat16 on CUDA, float32 elsewhere
    (bfloat16 on a CPU pays off with native bf16, see models.transformer.prepacks)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", prefer: str = "best", dtype: str = "float32"
) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, config dict) from a checkpoint or run directory.

    dtype: auto | float32 | bfloat16 (see inference_dtype). An int8 checkpoint (config.json
    has "quantization") always loads on the CPU, its other weights in float32."""
    weights_dtype = inference_dtype(dtype, device)  # a bad name is refused before anything is read
    directory = resolve_checkpoint(path, prefer)
    config = read_config(directory)
    tensors = load_weights(directory)
    int8_layers = {}
    if config.get("quantization"):  # `semilla export int8`: CPU-only int8 layers
        if dtype == "bfloat16":
            raise CheckpointError(f"{directory} is an int8 checkpoint: it runs in float32, not {dtype}")
        tensors, int8_layers = split_int8_state(tensors)
        device, weights_dtype = "cpu", torch.float32
    try:
        cfg = infer_shapes(model_config_from_dict(config["model"]), tensors)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    tokenizer = Tokenizer.load(directory)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{directory / 'model.safetensors'} does not match its config: {first}") from e
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if hasattr(model, "rebuild_buffers"):
        model.rebuild_buffers()  # RoPE tables and sinusoids are computed, not stored
    model.to(weights_dtype)
    apply_int8(model, int8_layers)
    model.eval()
    config["model"] = asdict(cfg)
    config["path"] = str(directory)
    return model, tokenizer, config
