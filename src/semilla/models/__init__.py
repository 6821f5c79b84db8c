"""Model families: a configurable decoder-only transformer and an LSTM."""

from __future__ import annotations

import torch
from torch import nn

from semilla.config import ModelConfig
from semilla.models.lstm import LSTMLanguageModel
from semilla.models.transformer import Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a config describes, with fresh weights (on the current default device)."""
    if cfg.arch == "lstm":
        return LSTMLanguageModel(cfg)
    return Transformer(cfg)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once), int8 layers' packed weights included."""
    from semilla.models.int8 import packed_parameters

    return sum(p.numel() for p in model.parameters()) + packed_parameters(model)


def flops_per_token(cfg: ModelConfig, n_params: int) -> int:
    """Forward-pass FLOPs per token at full context: 2 per weight plus attention (PaLM's count)."""
    if cfg.arch == "lstm":
        return 2 * n_params
    embed = cfg.vocab_size * cfg.n_embd + (cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0)
    matmul_params = n_params - embed + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
    attention = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd  # q.k and att.v
    return 2 * matmul_params + attention


def model_on_meta(cfg: ModelConfig) -> nn.Module:
    """Build without allocating memory: shapes and counts only (a 2B model costs nothing)."""
    with torch.device("meta"):
        return build_model(cfg)


__all__ = [
    "build_model",
    "count_parameters",
    "flops_per_token",
    "model_on_meta",
    "Transformer",
    "LSTMLanguageModel",
]
