"""Quality in time: how soon each trainer reaches its validation-loss target, side by side.

    make peers                                        # .venv-peers: torch 2.13 + litgpt + semilla
    pip install -e '.[bench]'                         # transformers, for the hf trainer
    python bench/quality_race.py --rounds 2 --threads 2

Three trainers on tinyshakespeare char (../shared/data/tinyshakespeare.txt, 90/10 split by
position, prepared once by `semilla prepare`), each in its own process with the same thread
count, in interleaved rounds (litgpt, hf, semilla, litgpt, hf, semilla, ...):

- semilla: `semilla train --data DATA`, its default recipe (no shape, no schedule given; extra
  flags with --semilla-flags, to race a candidate recipe). Target: validation loss <= 1.70.
- hf: nanoGPT's CPU recipe for this corpus in a plain PyTorch loop over Hugging Face's
  `GPT2LMHeadModel` with `torch.optim.AdamW`: 4 layers x 4 heads x 128, block 64, batch 12,
  lr 1e-3 (100 warm-up steps, cosine to 1e-4 at 2000), betas 0.9/0.99, weight decay 0.1, clip
  1.0, 2000 steps, validation every 250 steps on 20 batches. Target: 1.886, nanoGPT's own result
  for that recipe.
- litgpt: `litgpt pretrain` with the same recipe (its own loop, torch.compile'd; RoPE on a
  quarter of each head, as litgpt has no learned positions). Target: 1.886.

Every trainer validates on batches of the validation split and prints its validation losses as
it goes; the time of a validation loss is when its line reaches this script, counted from the
trainer's launch (imports, model set-up and compilation included: what a user waits for). A
trainer is stopped as soon as it reaches its target. The table gives each trainer's median time
to target over the rounds and semilla's speed-up over the faster peer (the peer's time / semilla's).
Writes bench/results/quality_race.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TRAINERS = ("litgpt", "hf", "semilla")
SEMILLA_TARGET, PEER_TARGET = 1.70, 1.886  # the peers' target: nanoGPT's val loss for its recipe
# nanoGPT's CPU recipe (its README): layers, heads, width, block, batch, and the schedule
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, MAX_ITERS, BETAS, WEIGHT_DECAY = 1e-3, 1e-4, 100, 2000, (0.9, 0.99), 0.1
EVAL_INTERVAL, EVAL_ITERS = 250, 20
# "step 250 val: loss 1.9 ..." (semilla, hf) and "iter 250: val loss 1.9, ..." (litgpt)
VAL_LINE = re.compile(r"(?:step|iter) (\d+)(?: val)?: (?:val )?loss ([0-9.]+)")


def split_tokens(data: Path, split: str) -> torch.Tensor:
    from semilla.batches import TokenDataset

    shards = TokenDataset(data, split).shards
    return torch.from_numpy(np.concatenate([np.asarray(s) for s in shards]).astype(np.int64))


def nanogpt_lr(step: int) -> float:
    """nanoGPT's schedule: linear warm-up, then cosine from LR to MIN_LR at MAX_ITERS."""
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    ratio = (step - WARMUP) / (MAX_ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def random_windows(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    offsets = torch.randint(len(tokens) - BLOCK - 1, (BATCH,), generator=generator)
    return torch.stack([tokens[o : o + BLOCK + 1] for o in offsets.tolist()])  # (BATCH, BLOCK + 1)


def run_hf(data: Path) -> None:
    """nanoGPT's recipe over GPT2LMHeadModel in a plain loop; prints each validation loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    train, val = split_tokens(data, "train"), split_tokens(data, "val")
    config = GPT2Config(
        vocab_size=int(max(train.max(), val.max())) + 1, n_positions=BLOCK, n_embd=N_EMBD,
        n_layer=N_LAYER, n_head=N_HEAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, MAX_ITERS + 1):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(step)
        batch = random_windows(train, generator)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % EVAL_INTERVAL == 0:
            model.eval()
            with torch.no_grad():
                losses = [
                    model(input_ids=b[:, :-1], labels=b[:, :-1]).loss.item()
                    for b in (random_windows(val, generator) for _ in range(EVAL_ITERS))
                ]
            model.train()
            print(f"step {step} val: loss {statistics.mean(losses):.4f}", flush=True)


try:  # litgpt's data module protocol, only where litgpt is installed (the litgpt trainer's process)
    from litgpt.data import DataModule

    class RaceWindows(DataModule):
        """Random (block + 1)-token windows: training from the train split, validation from val."""

        def __init__(self, path: str = ""):
            super().__init__()
            self.path = path
            self.batch_size, self.seq = 1, BLOCK

        def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None) -> None:
            self.batch_size, self.seq = batch_size, max_seq_length or BLOCK

        def train_dataloader(self):
            windows = _Windows(split_tokens(Path(self.path), "train"), self.seq + 1, seed=0)
            return torch.utils.data.DataLoader(windows, batch_size=self.batch_size)

        def val_dataloader(self):  # a fresh draw of EVAL_ITERS batches at every validation
            windows = _Windows(split_tokens(Path(self.path), "val"), self.seq + 1, seed=None)
            return torch.utils.data.DataLoader(windows, batch_size=self.batch_size)

    class _Windows(torch.utils.data.IterableDataset):
        def __init__(self, tokens: torch.Tensor, length: int, seed: int | None):
            self.tokens, self.length = tokens, length
            self.generator = torch.Generator().manual_seed(1 if seed is None else seed)
            self.fresh = seed is None

        def __iter__(self):
            generator = self.generator if self.fresh else torch.Generator().manual_seed(0)
            while True:
                o = int(torch.randint(len(self.tokens) - self.length, (1,), generator=generator))
                yield self.tokens[o : o + self.length]
except ImportError:
    pass


def litgpt_command(data: Path, out: Path, python: str, precision: str) -> list[str]:
    vocab = int(max(split_tokens(data, "train").max(), split_tokens(data, "val").max())) + 1
    config = dict(
        name="semilla-race", block_size=BLOCK, vocab_size=vocab, padding_multiple=1,
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, bias=True, norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP", parallel_residual=False, intermediate_size=4 * N_EMBD,
        gelu_approximate="none",
    )  # fmt: skip
    optimizer = {"class_path": "torch.optim.AdamW",
                 "init_args": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY}}  # fmt: skip
    return [
        python, "-m", "litgpt", "pretrain", "semilla-race", "--model_config", json.dumps(config),
        "--data", "quality_race.RaceWindows", "--data.path", str(data),
        "--out_dir", str(out), "--precision", precision, "--devices", "1", "--logger_name", "csv",
        "--tokenizer_dir", "null", "--optimizer", json.dumps(optimizer),
        "--train.micro_batch_size", str(BATCH), "--train.global_batch_size", str(BATCH),
        "--train.max_tokens", str(MAX_ITERS * BATCH * BLOCK), "--train.max_seq_length", str(BLOCK),
        "--train.log_interval", "50", "--train.save_interval", str(10**9),
        "--train.lr_warmup_steps", str(WARMUP), "--train.min_lr", str(MIN_LR), "--train.max_norm", "1.0",
        "--train.tie_embeddings", "true", "--eval.interval", str(EVAL_INTERVAL),
        "--eval.max_iters", str(EVAL_ITERS), "--eval.initial_validation", "false",
        "--eval.final_validation", "false",
    ]  # fmt: skip


# --- one trainer's run, timed from its launch ---------------------------------------------------


def race(name: str, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """Launch one trainer, timestamp each validation loss it prints, stop it at its target."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    if name == "semilla":
        target = SEMILLA_TARGET
        command = [sys.executable, "-m", "semilla", "train", "--data", str(data),
                   "--out-dir", str(work / "semilla"), "--overwrite", "--no-progress", *shlex.split(args.semilla_flags)]  # fmt: skip
    elif name.startswith("litgpt"):
        target = PEER_TARGET
        precision = "bf16-mixed" if name.endswith("bf16") else "32-true"
        command = litgpt_command(data, work / "litgpt", args.litgpt_python, precision)
        env["PYTHONPATH"] = f"{ROOT / 'bench'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    else:
        target = PEER_TARGET
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--data",
            str(data),
            "--threads",
            str(args.threads),
        ]
    evals: list[tuple[float, int, float]] = []  # (seconds since launch, step, val loss)
    tail: deque[str] = deque(maxlen=40)
    launch = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line)
        match = VAL_LINE.search(line)
        if match:
            evals.append((time.perf_counter() - launch, int(match[1]), float(match[2])))
            if evals[-1][2] <= target:
                proc.kill()
                break
    proc.stdout.close()
    if proc.wait() and not (evals and evals[-1][2] <= target):
        raise SystemExit(f"the {name} trainer failed:\n{''.join(tail)}")
    reached = next((e for e in evals if e[2] <= target), None)
    return {
        "seconds_total": round(time.perf_counter() - launch, 1),
        "trainer": name,
        "target": target,
        "seconds_to_target": round(reached[0], 1) if reached else None,
        "step_at_target": reached[1] if reached else None,
        "evals": [{"s": round(s, 1), "step": step, "val_loss": loss} for s, step, loss in evals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every trainer")
    parser.add_argument(
        "--trainers", default=",".join(TRAINERS),
        help="which, comma-separated (also hf-bf16 and litgpt-bf16: bf16 mixed precision)",
    )  # fmt: skip
    parser.add_argument("--semilla-flags", default="", help="extra `semilla train` flags: a candidate recipe")
    parser.add_argument(
        "--litgpt-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
        help="the Python of a venv with litgpt (`make peers` makes .venv-peers)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # the hf trainer's own process
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.worker.endswith("bf16")):
            return run_hf(Path(args.data))
    if not CORPUS.is_file():
        raise SystemExit(f"missing {CORPUS}: the shared corpora must sit beside the project")
    from semilla.data import prepare

    trainers = args.trainers.split(",")
    runs: dict[str, list[dict]] = {t: [] for t in trainers}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(
            [str(CORPUS)], str(data), tokenizer="char", split=(0.9, 0.1, 0.0), shuffle=False, progress=False
        )
        for r in range(args.rounds):
            for name in trainers:
                result = race(name, data, Path(tmp) / f"{name}-{r}", args)
                runs[name].append(result)
                last = result["evals"][-1] if result["evals"] else {"step": 0, "val_loss": float("nan")}
                print(
                    f"round {r + 1}: {name:12s} to {result['target']}: {result['seconds_to_target']} s "
                    f"(step {last['step']}, val loss {last['val_loss']:.4f}; ran {result['seconds_total']} s)",
                    flush=True,
                )

    def median_time(name: str) -> float:
        return statistics.median(
            math.inf if x["seconds_to_target"] is None else x["seconds_to_target"] for x in runs[name]
        )

    medians = {t: median_time(t) for t in trainers}
    print(f"\n{'trainer':12s} {'target':>7s} {'median s':>9s} {'min':>7s} {'max':>7s}")
    for t in trainers:
        times = [math.inf if x["seconds_to_target"] is None else x["seconds_to_target"] for x in runs[t]]
        print(f"{t:12s} {runs[t][0]['target']:7.3f} {medians[t]:9.1f} {min(times):7.1f} {max(times):7.1f}")
    peers = [t for t in trainers if t != "semilla"]
    report = {"rounds": args.rounds, "threads": args.threads, "semilla_flags": args.semilla_flags,
              "runs": runs, "median_seconds_to_target": medians, "cpus": os.cpu_count()}  # fmt: skip
    if "semilla" in medians and peers:
        fastest = min(peers, key=medians.get)
        report["speedup_over_fastest_peer"] = medians[fastest] / medians["semilla"]
        print(f"the fastest peer ({fastest}) / semilla = {report['speedup_over_fastest_peer']:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_race.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
