"""Training throughput side by side with the tools people would use instead.

    make peers                                       # .venv-peers: torch 2.13 + litgpt + semilla
    pip install -e '.[bench]'                        # transformers, for the hf trainer
    python bench/train_peers.py --rounds 3 --steps 200 --threads 2 --litgpt-python .venv-peers/bin/python
    python bench/train_peers.py --trainers semilla,semilla-fp32,hf-bf16,litgpt,litgpt-bf16

Trainers on the same data, shape, batch and thread count, each in its own process, in
interleaved rounds (semilla, hf, litgpt, semilla, hf, litgpt, ...):

- semilla: `semilla.train.train`, its own loop (nanoGPT's CPU recipe shape: gpt2 family, tied
  head, 4 layers x 4 heads x 128, block 64, batch 12, AdamW 1e-3, betas 0.9/0.99, wd 0.1) at its
  defaults (bfloat16 autocast where the device has native bf16) but with the peers' optimizer,
  AdamW, so that every trainer does the same work per step; semilla-compile: the same with
  `compile=True` (torch.compile, as litgpt does; the warm-up steps hold the compilation);
  semilla-fp32: `dtype=float32`;
  semilla-muon: its default optimizer (Muon on the blocks' matrices), whose step costs more
  and whose steps are worth more (bench/quality_race.py measures that).
- hf: what most users would write: a plain PyTorch loop over Hugging Face's `GPT2LMHeadModel` of
  the same shape with `torch.optim.AdamW` and gradient clipping at 1.0; hf-bf16: under bf16 autocast.
- litgpt: `litgpt pretrain`, litgpt's own pretraining loop from scratch (it compiles the model
  with torch.compile), same sizes, float32; litgpt-bf16: its `bf16-mixed` precision. litgpt has no
  learned position embeddings, so its attention uses RoPE on a quarter of each head.

`--shape gpt2 --device cuda` runs GPT-2 small's body on a GPU (bench/gpu.sh).

Data: ../shared/data/tinyshakespeare.txt, char-level, prepared once by `semilla prepare`; every
trainer draws random 65-token windows of the same token array. Each trainer reports the median of
its tokens/s over 10-step windows after a warm-up (the first 30% of steps: compilation, caches);
the table gives each trainer's median over rounds, its spread, and semilla's ratio to each peer.
Writes bench/results/train_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {  # layers, heads, width, block, batch
    "nanogpt": (4, 4, 128, 64, 12),  # nanoGPT's CPU recipe for tinyshakespeare char
    "gpt2": (12, 12, 768, 1024, 16),  # GPT-2 small's body (124M with its vocabulary), for a GPU
}
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = SHAPES["nanogpt"]
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.99), 0.1
WINDOW = 10  # steps per throughput window
# semilla at its defaults (bfloat16 autocast where the device has native bfloat16) with AdamW, in
# float32, and with its default optimizer (Muon);
# each peer in float32 and in bfloat16 mixed precision (autocast; litgpt's "bf16-mixed")
TRAINERS = (
    "semilla",
    "semilla-compile",
    "semilla-fp32",
    "semilla-muon",
    "hf",
    "hf-bf16",
    "litgpt",
    "litgpt-bf16",
)
DEVICE = "cpu"


def use_shape(name: str) -> None:
    global N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH
    N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = SHAPES[name]


def train_tokens(data: Path) -> np.ndarray:
    from semilla.batches import TokenDataset

    return np.concatenate([np.asarray(s) for s in TokenDataset(data, "train").shards])


def warm_median(rates: list[float]) -> float:
    """Median of the windows after the warm-up (the first 30% of them)."""
    return statistics.median(rates[int(0.3 * len(rates)) :])


# --- the trainers, one per process ---------------------------------------------------------------


def run_semilla(
    data: Path, steps: int, work: Path, dtype: str = "auto", optimizer: str = "adamw", compile: bool = False
) -> float:
    from semilla.config import ModelConfig, TrainConfig
    from semilla.train import train

    model = ModelConfig(
        norm="layernorm", pos="learned", mlp="gelu_exact", bias=True, tie_embeddings=True,
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK, dropout=0.0,
    )  # fmt: skip
    cfg = TrainConfig(
        data=str(data), out_dir=str(work / "semilla"), batch_size=BATCH, max_iters=steps,
        learning_rate=LR, min_lr=LR / 10, warmup_iters=10, beta1=BETAS[0], beta2=BETAS[1],
        weight_decay=WEIGHT_DECAY, grad_clip=1.0, eval_interval=steps, eval_iters=1,
        log_interval=WINDOW, save_interval=10**9, sample_interval=10**9, progress=False, device=DEVICE,
        dtype=dtype, optimizer=optimizer, compile=compile,
    )  # fmt: skip
    train(model, cfg)
    rows = [json.loads(line) for line in (work / "semilla" / "metrics.jsonl").open()]
    return warm_median([r["tokens_per_s"] for r in rows if r["kind"] == "train"])


def run_hf(data: Path, steps: int, work: Path, bf16: bool = False) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokens = torch.from_numpy(train_tokens(data).astype(np.int64))
    vocab = int(tokens.max()) + 1
    config = GPT2Config(
        vocab_size=vocab, n_positions=BLOCK, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    tokens = tokens.to(DEVICE)
    generator = torch.Generator().manual_seed(0)
    rates, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        offsets = torch.randint(len(tokens) - BLOCK - 1, (BATCH,), generator=generator)
        batch = torch.stack([tokens[o : o + BLOCK + 1] for o in offsets.tolist()])
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % WINDOW == 0:
            loss.item()
            now = time.perf_counter()
            rates.append(WINDOW * BATCH * BLOCK / (now - start))
            start = now
    return warm_median(rates)


def run_litgpt(data: Path, steps: int, work: Path, python: str, precision: str = "32-true") -> float:
    import csv

    config = dict(
        name="semilla-bench", block_size=BLOCK, vocab_size=int(train_tokens(data).max()) + 1,
        padding_multiple=1, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, bias=True,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", parallel_residual=False,
        intermediate_size=4 * N_EMBD, gelu_approximate="none",
    )  # fmt: skip
    optimizer = {"class_path": "torch.optim.AdamW",
                 "init_args": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY}}  # fmt: skip
    out = work / "litgpt"
    command = [
        python, "-m", "litgpt", "pretrain", "semilla-bench", "--model_config", json.dumps(config),
        "--data", "quality_race.RaceWindows", "--data.path", str(data),
        "--out_dir", str(out), "--precision", precision, "--devices", "1", "--logger_name", "csv",
        "--tokenizer_dir", "null", "--optimizer", json.dumps(optimizer),
        "--train.micro_batch_size", str(BATCH), "--train.global_batch_size", str(BATCH),
        "--train.max_tokens", str(steps * BATCH * BLOCK), "--train.max_seq_length", str(BLOCK),
        "--train.log_interval", str(WINDOW), "--train.save_interval", str(10**9),
        "--train.lr_warmup_steps", "10", "--train.min_lr", str(LR / 10), "--train.max_norm", "1.0", "--train.tie_embeddings", "true",
        "--eval.interval", str(10**9), "--eval.initial_validation", "false",
        "--eval.final_validation", "false",
    ]  # fmt: skip
    threads = str(torch.get_num_threads())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "PYTHONPATH": f"{ROOT / 'bench'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"litgpt pretrain failed:\n{done.stderr[-3000:]}")
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    # litgpt logs each window's wall time since its start; successive differences give the windows
    key = next(k for k in rows[0] if k == "time" or k.endswith("/time"))
    times = [float(r[key]) for r in rows if r.get(key)]
    rates = [WINDOW * BATCH * BLOCK / (b - a) for a, b in zip(times, times[1:], strict=False)]
    return warm_median(rates)


# --- the rounds ----------------------------------------------------------------------------------


def worker(name: str, data: Path, steps: int, threads: int, litgpt_python: str) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if name.startswith("litgpt"):  # its own process, in its own venv; the threads go by environment
            precision = "bf16-mixed" if name.endswith("bf16") else "32-true"
            rate = run_litgpt(data, steps, work, litgpt_python, precision)
        elif name.startswith("hf"):
            rate = run_hf(data, steps, work, bf16=name.endswith("bf16"))
        else:
            dtype = "float32" if name.endswith("fp32") else "auto"
            optimizer = "muon" if name.endswith("muon") else "adamw"
            rate = run_semilla(data, steps, work, dtype, optimizer, compile=name.endswith("compile"))
    print(json.dumps({"trainer": name, "tokens_per_s": rate}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per trainer and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every trainer")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="which, comma-separated")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="nanogpt", help="model shape (default: nanogpt)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (litgpt runs on the CPU only here)")
    parser.add_argument(
        "--litgpt-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
        help="the Python of a venv with litgpt (`make peers` makes .venv-peers)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    use_shape(args.shape)
    if args.worker:
        return worker(args.worker, Path(args.data), args.steps, args.threads, args.litgpt_python)
    if not CORPUS.is_file():
        raise SystemExit(f"missing {CORPUS}: the shared corpora must sit beside the project")
    from semilla.data import prepare

    trainers = args.trainers.split(",")
    rates: dict[str, list[float]] = {t: [] for t in trainers}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(
            [str(CORPUS)], str(data), tokenizer="char", split=(0.9, 0.1, 0.0), shuffle=False, progress=False
        )
        for r in range(args.rounds):
            for name in trainers:
                command = [sys.executable, __file__, "--worker", name, "--data", str(data), "--steps",
                           str(args.steps), "--threads", str(args.threads), "--litgpt-python", args.litgpt_python,
                           "--shape", args.shape, "--device", args.device]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"the {name} trainer failed:\n{done.stderr[-3000:]}")
                rate = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]
                rates[name].append(rate)
                print(f"round {r + 1}: {name:15s} {rate:9.0f} tokens/s", flush=True)
    medians = {t: statistics.median(v) for t, v in rates.items()}
    print(f"\n{'trainer':14s} {'median tok/s':>12s} {'min':>8s} {'max':>8s} {'semilla/it':>10s}")
    for t, v in rates.items():
        ratio = medians["semilla"] / medians[t] if "semilla" in medians else float("nan")
        print(f"{t:14s} {medians[t]:12.0f} {min(v):8.0f} {max(v):8.0f} {ratio:10.2f}")
    peers = [t for t in medians if not t.startswith("semilla")]
    if peers:
        fastest = max(peers, key=medians.get)
        for ours in (t for t in medians if t.startswith("semilla")):
            print(f"{ours} / the fastest peer ({fastest}) = {medians[ours] / medians[fastest]:.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = {"rounds": args.rounds, "steps": args.steps, "threads": args.threads, "shape": args.shape,
              "device": args.device, "tokens_per_s": rates,
              "medians": medians, "machine": os.uname().machine, "cpus": os.cpu_count()}  # fmt: skip
    suffix = "" if (args.shape, args.device) == ("nanogpt", "cpu") else f"-{args.shape}-{args.device}"
    (out / f"train_peers{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
