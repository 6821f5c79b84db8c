"""Training speed and quality on tinyshakespeare at nanoGPT's CPU recipe shape (semilla alone;
bench/train_peers.py runs the peers side by side).

    python bench/train_shakespeare.py --run nanogpt-shape   # nanoGPT's recipe, same shape
    python bench/train_shakespeare.py --run best-100s       # our best configuration in 101.5 s

Data: ../shared/data/tinyshakespeare.txt, char-level, 90/10 split by position as nanoGPT's
prepare.py does. Prints the figures and writes bench/results/train_shakespeare-<run>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from semilla.config import ModelConfig, TrainConfig
from semilla.data import prepare
from semilla.train import train

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

RUNS = {
    # nanoGPT README CPU recipe: gpt2 family, tied head, 4x4x128, block 64, batch 12, 2000 iters
    "nanogpt-shape": (
        dict(norm="layernorm", pos="learned", mlp="gelu_exact", bias=True, tie_embeddings=True,
             n_layer=4, n_head=4, n_embd=128, block_size=64),
        dict(batch_size=12, max_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
             beta2=0.99, weight_decay=0.1, eval_interval=250, eval_iters=20, log_interval=10),
    ),
    # llama family, 3e-3 -> 3e-4 cosine, context 128, one evaluation at the end: sized to take
    # about 100 s on an idle 2-core machine
    "best-100s": (
        dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False,
             n_layer=4, n_head=4, n_embd=128, block_size=128),
        dict(batch_size=16, max_iters=800, learning_rate=3e-3, min_lr=3e-4, warmup_iters=50,
             beta2=0.99, weight_decay=0.1, eval_interval=800, eval_iters=20, log_interval=10),
    ),
}  # fmt: skip


def run(name: str, work: Path, compile_model: bool) -> dict:
    data = work / "data"
    if not data.exists():
        prepare([str(CORPUS)], str(data), tokenizer="char", split=(0.9, 0.1, 0.0), shuffle=False)
    model_kw, train_kw = RUNS[name]
    model_cfg = ModelConfig(**model_kw)
    train_cfg = TrainConfig(
        data=str(data), out_dir=str(work / name), save_interval=10**9, sample_interval=10**9,
        progress=False, compile=compile_model, **train_kw,
    )  # fmt: skip
    start = time.perf_counter()
    result = train(model_cfg, train_cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
    tok_s = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][1:]  # first window: warm-up
    vals = [r for r in rows if r["kind"] == "val"]
    median_tok_s = statistics.median(tok_s)
    tokens_per_iter = train_cfg.batch_size * model_cfg.block_size
    return {
        "run": name,
        "compile": compile_model,
        "model": model_kw,
        "train": train_kw,
        "median_tokens_per_s": round(median_tok_s),
        "median_ms_per_iter": round(1000 * tokens_per_iter / median_tok_s, 2),
        "final_val_loss": round(vals[-1]["loss"], 4),
        "best_val_loss": round(result["best_val_loss"], 4),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", choices=sorted(RUNS), action="append", help="which runs (default: all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    if not CORPUS.is_file():
        raise SystemExit(f"missing {CORPUS}: the shared corpora must sit beside the project")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.run or sorted(RUNS):
            r = run(name, Path(tmp), args.compile)
            print(json.dumps(r))
            suffix = "-compile" if args.compile else ""
            (out / f"train_shakespeare-{name}{suffix}.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
