"""What a training step measures: the loss over the targets that count, accuracy, top-5
accuracy and perplexity summed over micro-batches, and peak memory."""

from __future__ import annotations

import logging
import math
import resource

import torch
import torch.nn.functional as F

from semilla.batches import IGNORE_INDEX

log = logging.getLogger(__name__)


def loss_fn(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, count: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (not IGNORE_INDEX), or their sum over
    `count` (a whole step's counted targets, when it spans micro-batches); 0 if none counts."""
    total = F.cross_entropy(
        logits.view(-1, logits.size(-1)).float(),
        targets.view(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / (count if count is not None else (targets != IGNORE_INDEX).sum().clamp(min=1))


def metric_sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Summed cross-entropy, token accuracy and top-5 accuracy over the targets that count."""
    flat, y = logits.detach().float().view(-1, logits.size(-1)), targets.reshape(-1)
    counted = y != IGNORE_INDEX
    flat, y = flat[counted], y[counted]
    top5 = flat.topk(min(5, flat.size(-1)), dim=-1).indices
    return {
        "loss": F.cross_entropy(flat, y, reduction="sum").item(),
        "acc": (top5[:, 0] == y).sum().item(),
        "top5_acc": (top5 == y[:, None]).any(-1).sum().item(),
        "count": len(y),
    }


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Cross-entropy, perplexity, token accuracy and top-5 accuracy from metric_sums."""
    n = max(1, sums["count"])
    loss = sums["loss"] / n
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "acc": sums["acc"] / n,
        "top5_acc": sums["top5_acc"] / n,
    }


def batch_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Cross-entropy, perplexity, token accuracy and top-5 accuracy of one batch."""
    return mean_metrics(metric_sums(logits, targets))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
