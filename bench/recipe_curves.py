"""Validation loss against tokens for candidate training recipes (optimizer, batch, context,
learning rates): how the default recipe of `semilla train` was chosen.

    python bench/recipe_curves.py --optimizer adamw                 # the old default: AdamW, batch 16
    python bench/recipe_curves.py --optimizer muon                  # Muon on the blocks' matrices
    python bench/recipe_curves.py --optimizer muon --batch 8 --steps 1600 --eval 100

semilla's model (llama, 4 layers x 4 heads x 128 by default) and optimizers (semilla.optim),
bf16 autocast where the CPU has native bf16, one thread, tinyshakespeare char-level (the first
90% trains, the last 10% validates, as bench/quality_race.py splits it). A plain loop: the
schedule is semilla's (linear warm-up, cosine to a tenth), gradients clipped at 1.0, and every
--eval steps the loss over the same 20 validation batches of 16 x 128 tokens. Tokens per step
are --batch x --block, so runs of different batch sizes compare at equal tokens. Prints one line
per evaluation (step, tokens, validation loss, training seconds) and the curve as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from semilla.batches import TokenDataset
from semilla.config import ModelConfig, TrainConfig
from semilla.data import prepare
from semilla.models import build_model
from semilla.optim import make_optimizer

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="muon", choices=("muon", "adamw"))
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW's, and Muon's)")
    p.add_argument("--muon-lr", type=float, help="Muon's peak learning rate, if not --lr")
    p.add_argument("--steps", type=int, default=800, help="steps; the cosine ends there")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval", type=int, default=50, help="steps between evaluations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the model's initialisation and the batches' order")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        prepare([str(CORPUS)], tmp, tokenizer="char", split=(0.9, 0.1, 0.0), shuffle=False, progress=False)
        train, val = TokenDataset(tmp, "train"), TokenDataset(tmp, "val")
        vocab = json.loads((Path(tmp) / "meta.json").read_text())["vocab_size"]
        curve = run(a, train, val, vocab)
    print(json.dumps({"args": vars(a), "curve": curve}))


def run(a: argparse.Namespace, train: TokenDataset, val: TokenDataset, vocab: int) -> list[dict]:
    model = build_model(ModelConfig(vocab_size=vocab, block_size=a.block))
    optimizer = make_optimizer(
        model, TrainConfig(optimizer=a.optimizer, learning_rate=a.lr), torch.device("cpu")
    )
    peaks = [
        a.muon_lr if g.get("optimizer") == "muon" and a.muon_lr else a.lr for g in optimizer.param_groups
    ]
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return F.cross_entropy(model(x).float().view(-1, vocab), y.view(-1))

    def validate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            total = sum(loss_of(*val.random_batch(16, 128, g)).item() for _ in range(20))
        model.train()
        return total / 20

    g, seconds, curve = torch.Generator().manual_seed(1 + a.seed), 0.0, []
    for step in range(a.steps):
        start = time.perf_counter()
        if step < a.warmup:
            scale = (step + 1) / (a.warmup + 1)
        else:
            progress = (step - a.warmup) / max(1, a.steps - a.warmup)
            scale = 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for group, peak in zip(optimizer.param_groups, peaks, strict=True):
            group["lr"] = peak * scale
        loss_of(*train.random_batch(a.batch, a.block, g)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if (step + 1) % a.eval == 0:
            point = {
                "step": step + 1,
                "tokens": (step + 1) * a.batch * a.block,
                "val_loss": round(validate(), 4),
            }
            curve.append({**point, "train_s": round(seconds, 1)})
            print(" ".join(f"{k} {v}" for k, v in curve[-1].items()), flush=True)
    return curve


if __name__ == "__main__":
    main()
