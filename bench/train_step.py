"""Where a training step's time goes: the same step with parts of semilla's CPU kernels on or off,
interleaved in one process.

    python bench/train_step.py                                  # the default model, one thread
    python bench/train_step.py --variants kernels,operators,compiled --rounds 10

The default model and recipe of `semilla train` (llama 4 x 4 x 128, batch 8 x 128, Muon + AdamW,
bfloat16 autocast where the CPU has native bf16) on tinyshakespeare char (prepared once, as
bench/quality_race.py prepares it). Each variant is its own model and optimizer, built from the
same seed; the rounds run every variant for --steps steps in turn (variant A, B, C, A, B, C, ...),
so a machine that slows down or speeds up does so for all of them. Variants:

- kernels: semilla as it trains (models/fused_ops.py: RMSNorm, SwiGLU, RoPE and attention
  through semilla's kernels);
- attention-sdpa: the same, but attention through PyTorch's float32 kernel;
- operators: every part of fused_ops as PyTorch operators (no semilla kernel);
- compiled: torch.compile'd (the compiler's own fusions; its compilation is in the warm-up).

Prints each variant's median milliseconds per step (optimizer step included) over the rounds,
its spread, and each one's ratio to the first.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from semilla.config import ModelConfig, TrainConfig
from semilla.data import prepare
from semilla.models import fused_ops, kernels
from semilla.train import loss_fn
from semilla.train_setup import setup

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = ("kernels", "attention-sdpa", "operators", "compiled")


@contextlib.contextmanager
def variant_parts(name: str) -> Iterator[None]:
    """The kernels a variant turns off, for as long as its steps run."""
    saved = kernels.elementwise, fused_ops.causal_attention
    if name == "operators":
        kernels.elementwise = lambda *tensors: None
    if name == "attention-sdpa":
        fused_ops.causal_attention = lambda q, k, v: None
    try:
        yield
    finally:
        kernels.elementwise, fused_ops.causal_attention = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants", default="kernels,attention-sdpa,operators", help=f"from {','.join(VARIANTS)}"
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    names = a.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(
            [str(CORPUS)], str(data), tokenizer="char", split=(0.9, 0.1, 0.0), shuffle=False, progress=False
        )
        trainers = {
            name: setup(
                ModelConfig(),
                TrainConfig(
                    data=str(data), out_dir=f"{tmp}/{name}", progress=False, compile=name == "compiled"
                ),
                None,
                True,
            )
            for name in names
        }
        for name, t in trainers.items():  # warm-up: caches, oneDNN's plans, the compilation
            start = time.perf_counter()
            with variant_parts(name):
                for _ in range(5):
                    step(t)
            print(f"{name:15s} warm-up {time.perf_counter() - start:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(a.rounds):
            for name, t in trainers.items():
                with variant_parts(name):
                    start = time.perf_counter()
                    for _ in range(a.steps):
                        step(t)
                    times[name].append((time.perf_counter() - start) / a.steps * 1000)
            print(f"round {r + 1}: " + "  ".join(f"{n} {times[n][-1]:.1f} ms" for n in names), flush=True)
    first = statistics.median(times[names[0]])
    print(f"\n{'variant':15s} {'median ms/step':>14s} {'min':>7s} {'max':>7s} {'vs ' + names[0]:>14s}")
    for name in names:
        median = statistics.median(times[name])
        print(
            f"{name:15s} {median:14.1f} {min(times[name]):7.1f} {max(times[name]):7.1f} {median / first:13.2f}x"
        )


def step(t) -> None:
    """One training step as semilla.train.fit runs it (forward and loss under autocast,
    backward, clipping, the optimizer)."""
    x, y = t.train_data.random_batch(t.config.batch_size, t.model_config.block_size, t.data_rngs[0])
    with torch.autocast("cpu", dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None):
        loss = loss_fn(t.train_forward(x), y, 0.0, int((y != -100).sum()))
    loss.backward()
    nn.utils.clip_grad_norm_(t.model.parameters(), t.config.grad_clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
