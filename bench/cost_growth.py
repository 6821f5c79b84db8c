"""How cost grows with the work: training at 1M, 10M and 50M parameters, `prepare` at 10 MB and
1 GB, serving 1 to 64 clients.

    python bench/cost_growth.py                          # all three parts
    python bench/cost_growth.py --part train --part prepare
    OMP_NUM_THREADS=1 python bench/cost_growth.py --part train --steps 15   # one thread, a busy machine

- train: `semilla train` (its defaults: llama family, bfloat16 autocast where the CPU has native
  bf16) on tinyshakespeare char at three shapes, block 256, batch 8, each in its own process;
  tokens/s is the median of the logged 5-step windows after the first, peak memory the process's
  peak resident memory (ru_maxrss of a wrapper whose only child it is).
- prepare: `semilla prepare` (char tokenizer) on the shared corpora repeated to 10 MB and 1 GB,
  written to disk piece by piece and deleted afterwards (bench/prepare_memory.py's measure).
- serve: bench/serve_load.py (datashark-10m shape, 128-token streams) at 1, 4, 16 and 64 clients.

Prints one JSON line per measurement and writes bench/results/cost_growth.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prepare_memory import MEASURE, SHARED, build_corpus, measure
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
CORPUS = SHARED / "tinyshakespeare.txt"
SHAPES = {  # name: (layers, heads, width); llama family, a 65-character vocabulary
    "1M": (5, 4, 128),
    "10M": (6, 6, 384),
    "50M": (10, 10, 640),
}
BLOCK, BATCH, WINDOW = 256, 8, 5


def train_cost(data: Path, name: str, steps: int, work: Path) -> dict:
    layers, heads, width = SHAPES[name]
    out = work / f"train-{name}"
    flags = {"n-layer": layers, "n-head": heads, "n-embd": width, "block-size": BLOCK, "batch-size": BATCH,
             "max-iters": steps, "warmup-iters": 2, "log-interval": WINDOW, "eval-interval": steps,
             "eval-iters": 1, "save-interval": 10**6, "sample-interval": 10**6}  # fmt: skip
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "semilla", "train", "--data", str(data),
           "--out-dir", str(out), "--no-progress", *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    code, maxrss_kb = done.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(f"semilla train failed: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    rates = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][1:]  # the first: warm-up
    with safe_open(out / "last" / "model.safetensors", "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    shutil.rmtree(out)
    return {
        "part": "train",
        "shape": name,
        "layers_heads_width": [layers, heads, width],
        "parameters": parameters,
        "tokens_per_s": round(statistics.median(rates), 1),
        "peak_rss_mb": round(int(maxrss_kb) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", action="append", choices=("train", "prepare", "serve"), help="default: all")
    parser.add_argument("--steps", type=int, default=20, help="training steps per shape (default: 20)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1024], help="prepare corpora, MB")
    parser.add_argument("--serve-repeats", type=int, default=1, help="serve_load.py --repeats")
    args = parser.parse_args()
    parts = args.part or ["train", "prepare", "serve"]
    results = []
    with tempfile.TemporaryDirectory(prefix="semilla-cost-") as tmp:
        work = Path(tmp)
        if "train" in parts:
            from semilla.data import prepare

            data = work / "shakespeare"
            prepare([str(CORPUS)], str(data), tokenizer="char", split=(0.9, 0.1, 0.0), progress=False)
            for name in SHAPES:
                results.append(train_cost(data, name, args.steps, work))
                print(json.dumps(results[-1]), flush=True)
        if "prepare" in parts:
            sources = sorted(SHARED.glob("*.txt"))
            for size in args.sizes:
                corpus, out = work / f"corpus-{size}mb.txt", work / f"prepared-{size}"
                build_corpus(corpus, size, sources)
                results.append({"part": "prepare", **measure(corpus, out, "char")})
                corpus.unlink()
                shutil.rmtree(out)
                print(json.dumps(results[-1]), flush=True)
    if "serve" in parts:
        start = time.perf_counter()
        command = [
            sys.executable,
            str(ROOT / "bench" / "serve_load.py"),
            "--repeats",
            str(args.serve_repeats),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        served = json.loads((ROOT / "bench" / "results" / "serve_load.json").read_text())
        for r in served["rounds"]:
            results.append({"part": "serve", **{k: r[k] for k in ("clients", "tokens_per_s", "errors")}})
            print(json.dumps(results[-1]), flush=True)
        print(json.dumps({"serve_seconds": round(time.perf_counter() - start, 1)}))
    out = ROOT / "bench" / "results" / f"cost_growth{'' if args.part is None else '-' + '-'.join(parts)}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
