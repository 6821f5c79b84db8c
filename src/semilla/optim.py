"""The training optimizers: AdamW, or Muon for the transformer blocks' matrices with AdamW for
the rest (embeddings, head, norms, biases, an LSTM's weights). LoRA adapters and FSDP's shards
train with AdamW.

Muon (Keller Jordan, 2024; torch.optim.Muon) orthogonalises each matrix's momentum with a few
Newton-Schulz iterations before the update. With Moonshot's learning-rate adjustment
("match_rms_adamw") its updates have AdamW's size, so one learning rate and weight decay serve
both halves. On tinyshakespeare at semilla's default shape it reaches a validation loss in
about half the steps AdamW needs (bench/README.md, "Tokens to quality").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semilla.config import TrainConfig


def muon_matrices(model: nn.Module) -> set[nn.Parameter]:
    """The weights Muon updates: every trainable nn.Linear weight inside the transformer's
    blocks (attention and MLP projections). Not the embeddings or the output head (Muon's
    authors keep those on AdamW), not an LSTM."""
    from semilla.models.transformer import DecoderLayer

    return {
        module.weight
        for layer in model.modules()
        if isinstance(layer, DecoderLayer)
        for module in layer.modules()
        if type(module) is nn.Linear and module.weight.requires_grad
    }


def resolved_optimizer(cfg: TrainConfig) -> str:
    """The optimizer a config means: "auto" is Muon, or AdamW when FSDP shards the matrices or
    only LoRA adapters train."""
    if cfg.optimizer == "auto":
        return "adamw" if cfg.fsdp or cfg.lora_r else "muon"
    return cfg.optimizer


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over the model's trainable parameters: weight decay
    on matrices only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = muon_matrices(model) if resolved_optimizer(cfg) == "muon" else set()
    decayed = [p for p in params if p.dim() >= 2 and p not in muon]
    groups = [
        {"params": decayed, "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel is one pass over all parameters: ~20% of a small model's step on CPU
    fused = device.type in ("cpu", "cuda")
    betas = (cfg.beta1, cfg.beta2)
    if not muon:
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)
    matrices = [p for p in params if p in muon]  # in the model's order: checkpoints list them so
    return MuonAdamW(
        matrices, groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=betas, fused=fused
    )


class MuonAdamW(torch.optim.Optimizer):
    """Muon on `matrices`, AdamW on `adamw_groups`, as one optimizer: one list of parameter
    groups (the learning-rate schedule sets every group's "lr") and one state keyed by
    parameter, so checkpoints, resume and growth treat it as they treat AdamW. The groups'
    "optimizer" entry says which of torch's two optimizers steps them."""

    def __init__(
        self,
        matrices: list[nn.Parameter],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        fused: bool,
    ):
        self.muon = torch.optim.Muon(
            [{"params": matrices, "optimizer": "muon"}],
            lr=lr,
            weight_decay=weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        self.adamw = torch.optim.AdamW(
            [{**g, "optimizer": "adamw"} for g in adamw_groups], lr=lr, betas=betas, fused=fused
        )
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point both inner optimizers at this one's group dicts and state."""
        self.muon.param_groups = [g for g in self.param_groups if g["optimizer"] == "muon"]
        self.adamw.param_groups = [g for g in self.param_groups if g["optimizer"] == "adamw"]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss
