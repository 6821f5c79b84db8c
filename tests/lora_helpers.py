"""Tiny checkpoints and LoRA adapters for the serving tests: a random base with a long context
(streams long enough to act on mid-flight), adapters with random B (a fresh adapter's B = 0 does
nothing), and the base with an adapter merged in as a checkpoint of its own (the oracle)."""

from __future__ import annotations

from pathlib import Path

import torch
from export_helpers import tokenizer_of
from generation_helpers import tiny_model

from semilla.checkpoint import load_checkpoint, save_checkpoint
from semilla.models.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    save_adapter,
)


def tiny_base(directory: Path, seed: int = 0, **shape) -> Path:
    """A tiny random llama with a char tokenizer and a 1024-token context, saved as a checkpoint."""
    tok = tokenizer_of("char")
    model = tiny_model(tok, seed, **{"block_size": 1024, "n_head": 4, "n_kv_head": 2, **shape})
    return save_checkpoint(directory, model, tok)


def random_adapter(
    ckpt: Path, directory: Path, targets: str = "q_proj,v_proj", r: int = 4, seed: int = 0, scale: float = 0.5
) -> Path:
    """A PEFT adapter directory for `ckpt` whose B weights are random (it changes the answers)."""
    model, _, _ = load_checkpoint(ckpt)
    config = LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets)
    apply_lora(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * scale)
    return save_adapter(directory, model, config, str(ckpt))


def merged_checkpoint(ckpt: Path, adapter: Path, directory: Path) -> Path:
    """`ckpt` with `adapter` merged into its weights, saved as a checkpoint."""
    model, tok, _ = load_checkpoint(ckpt)
    load_adapter(model, adapter)
    return save_checkpoint(directory, merge_and_unload(model), tok)
