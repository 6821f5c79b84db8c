"""`semilla info`: size, compute and memory of a preset or a checkpoint, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semilla.config import PRESETS, ModelConfig, preset
from semilla.errors import SemillaError
from semilla.models import count_parameters, flops_per_token, model_on_meta


def describe_config(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter count, FLOPs per token and memory estimates; builds on the meta device."""
    model = model_on_meta(cfg)  # shapes only: a 2B model allocates nothing
    n = count_parameters(model)
    embedding = cfg.vocab_size * cfg.n_embd
    report: dict[str, Any] = {
        "arch": cfg.arch if cfg.arch == "lstm" else f"transformer ({cfg.family or 'custom'} family)",
        "parameters": n,
        "parameters_human": _human(n),
        "non_embedding_parameters": n
        - embedding
        - (0 if cfg.tie_embeddings or cfg.arch == "lstm" else embedding),
        "vocab_size": cfg.vocab_size,
        "context": cfg.block_size,
        "layers": cfg.n_layer,
        "width": cfg.n_embd,
    }
    if cfg.arch == "transformer":
        report.update(
            heads=cfg.n_head,
            kv_heads=cfg.kv_heads,
            ffn=cfg.ffn_size,
            norm=cfg.norm,
            pos=cfg.pos,
            mlp=cfg.mlp,
        )
    flops = flops_per_token(cfg, n)
    report["forward_flops_per_token"] = flops
    report["training_flops_per_token"] = 3 * flops  # forward + backward (2x)
    report["weights_fp32"] = _bytes(4 * n)
    report["weights_bf16"] = _bytes(2 * n)
    report["training_memory_adamw_fp32"] = (
        _bytes(16 * n) + " (weights, grads, 2 AdamW moments; activations extra)"
    )
    if cfg.arch == "transformer":
        kv_per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * 4
        report["kv_cache_per_token_fp32"] = _bytes(kv_per_token)
        report["kv_cache_full_context_fp32"] = _bytes(kv_per_token * cfg.block_size)
    return report


def describe(target: str) -> dict[str, Any]:
    """`target` is a preset name or a checkpoint (or run) directory."""
    if target in PRESETS:
        return {"preset": target, **describe_config(preset(target))}
    if Path(target).exists():
        from semilla.checkpoint import infer_shapes, read_config, resolve_checkpoint, weight_shapes
        from semilla.config import model_config_from_dict
        from semilla.runs import human_size, run_summary, size_on_disk

        directory = resolve_checkpoint(target)
        config = read_config(directory)
        cfg = infer_shapes(model_config_from_dict(config["model"]), weight_shapes(directory))
        report = {"checkpoint": str(directory), **describe_config(cfg)}
        summary = run_summary(target)
        if summary is not None and summary["kind"] == "run":
            report["steps_trained"] = summary["steps"] if summary["steps"] is not None else "-"
            loss = summary["best_val_loss"]
            report["best_val_loss"] = f"{loss:.4f}" if loss is not None else "-"
        report["size_on_disk"] = human_size(summary["size_bytes"] if summary else size_on_disk(directory))
        ages = ages_history(Path(target), directory)
        return {**report, "ages": ages} if ages else report
    raise SemillaError(f"{target!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


def ages_history(target: Path, checkpoint: Path) -> list[dict[str, Any]]:
    """The ages a run grew through (age, shape, parameters, steps, val loss at each age's end),
    like THAU's get_stats(): from the run's last/ checkpoint, or the checkpoint itself."""
    import json

    for state in (target / "last" / "trainer_state.json", checkpoint / "trainer_state.json"):
        if state.is_file():
            return json.loads(state.read_text(encoding="utf-8")).get("ages", [])
    return []


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
