"""Data-parallel training: tokens/s of one process against two (DDP, gloo on CPU), side by side.

The same global batch (grad_accum 2 micro-batches of --batch-size sequences) on nanoGPT's CPU
shape, trained --steps steps in interleaved rounds:

- one process, one thread: the per-worker baseline that scaling efficiency is measured against
  (efficiency = tokens/s of N processes / (N x tokens/s of one));
- one process, two threads: what the machine gives one process otherwise;
- two processes (`semilla train --nproc 2`), one thread each.

Tokens/s: the median of the logged throughput after the first log line (warm-up). A multi-node
run is printed at the end (torchrun's rendezvous on the first machine).

    python bench/ddp.py                 # 3 rounds, a few minutes on 2 cores
    python bench/ddp.py --rounds 1 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
MULTI_NODE = (
    "torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint FIRST_HOST:29500 "
    "--rdzv-id RUN_NAME -m semilla train --data DATA --out-dir RUN --grad-accum MULTIPLE_OF_2N ...   "
    "# the same command on both machines; rank 0 (on the first) writes RUN"
)


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def run(name: str, data: Path, out: Path, steps: int, batch: int, threads: int, nproc: int) -> float:
    """Train one configuration; its median tokens/s after the warm-up."""
    settings = {
        **SHAPE, "batch_size": batch, "grad_accum": 2, "max_iters": steps, "warmup_iters": 10,
        "log_interval": 5, "eval_interval": 100_000, "eval_iters": 1, "save_interval": 100_000,
        "sample_interval": 100_000, "device": "cpu", "data": data, "out_dir": out,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "semilla", "train", *flags(settings), "--no-progress", "--overwrite"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][1:]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configs = {
        "1 process, 1 thread": (1, 1),
        "1 process, 2 threads": (2, 1),
        "2 processes, 1 thread each": (1, 2),
    }
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "semilla", "prepare", str(DATA), "-o", str(data), "-q"], check=True,
                       capture_output=True)  # fmt: skip
        for r in range(args.rounds):  # interleaved: the machine's load drifts alike for every configuration
            for name, (threads, nproc) in configs.items():
                tps = run(
                    name,
                    data,
                    Path(tmp) / f"run{nproc}{threads}",
                    args.steps,
                    args.batch_size,
                    threads,
                    nproc,
                )
                speeds[name].append(tps)
                print(f"round {r + 1}: {name:<28} {tps:>9,.0f} tokens/s", flush=True)
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    base = medians["1 process, 1 thread"]
    two = medians["2 processes, 1 thread each"]
    result = {
        "shape": SHAPE, "batch_size": args.batch_size, "grad_accum": 2, "steps": args.steps, "rounds": args.rounds,
        "tokens_per_s": speeds, "median_tokens_per_s": medians,
        "scaling_efficiency": two / (2 * base),
        "two_processes_vs_two_threads": two / medians["1 process, 2 threads"],
        "cpu_count": os.cpu_count(), "multi_node": MULTI_NODE,
    }  # fmt: skip
    print()
    for name, tps in medians.items():
        print(f"{name:<28} {tps:>9,.0f} tokens/s (median)")
    print(f"scaling efficiency (2 processes vs 2 x 1):  {result['scaling_efficiency']:.0%}")
    print(f"2 processes vs 1 process with 2 threads:     {result['two_processes_vs_two_threads']:.2f}x")
    print(f"multi-node: {MULTI_NODE}")
    out = Path(__file__).parent / "results" / "ddp.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
