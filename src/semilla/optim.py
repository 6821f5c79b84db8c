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

import math
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
        for group in self.muon.param_groups:
            muon_step(group, self.state)
        self.adamw.step()
        return loss


@torch.no_grad()
def muon_step(group: dict[str, Any], state: dict) -> None:
    """torch.optim.Muon's update of one parameter group, with the Newton-Schulz iterations of
    all same-shape matrices run as one batch: the same arithmetic (and state) as torch's loop
    over matrices, in a few batched matmuls instead of some 15 small ones per matrix (a
    small model's 28 matrices made a quarter of its training step on one CPU thread)."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
    buffers = [state[p]["momentum_buffer"] for p in params]
    momentum, lr = group["momentum"], group["lr"]
    torch._foreach_lerp_(buffers, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
    torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
    by_shape: dict[torch.Size, list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(p.shape, []).append(i)
    for shape, index in by_shape.items():
        ortho = orthogonalise(
            torch.stack([updates[i] for i in index]),
            group["ns_coefficients"],
            group["ns_steps"],
            group["eps"],
        )
        torch._foreach_add_(
            [params[i] for i in index], list(ortho.float().unbind()), alpha=-lr * lr_ratio(group, shape)
        )


def orthogonalise(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Muon's quintic Newton-Schulz iteration on a batch of matrices (n, rows, cols), in
    bfloat16, as torch.optim.Muon runs it on one: each scaled to spectral norm <= 1, worked on
    in its wide orientation, and brought to roughly U V^T of its SVD."""
    a, b, c = coefficients
    x = updates.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def lr_ratio(group: dict[str, Any], shape: torch.Size) -> float:
    """Muon's learning-rate factor for a matrix of `shape` (torch.optim.Muon's adjust_lr_fn):
    Moonshot's 0.2 * sqrt(max dimension) gives updates AdamW's RMS; the original sqrt(rows / cols)."""
    rows, cols = shape[:2]
    if group["adjust_lr_fn"] == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))
