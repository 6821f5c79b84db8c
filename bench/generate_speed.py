"""Decode speed: single stream with and without the KV cache, and batched throughput.

    python bench/generate_speed.py            # both shapes, both dtypes, 3 repeats, medians
    python bench/generate_speed.py --repeats 5 --shape datashark-10m --dtype float32

Shapes: `datashark-10m` (gpt2 family, 8 x 320, 38-token vocab) and `llama-50m` (llama family,
8 layers x 640, 10 heads, 8192 vocab, ~50M parameters). Weights are random: speed does not
depend on them. Prompt 64 tokens, 256 new tokens, greedy, end-of-sequence ignored. Each repeat
is one round of every case (so a slow spell of a shared machine hits them all); medians.
float32 always; bfloat16 (what `--dtype bfloat16` loads) by default only where the CPU has
native bf16 (AMX / AVX512-BF16: prepacked oneDNN kernels), elsewhere on request.
Writes bench/results/generate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from semilla.config import GenerateConfig, ModelConfig, preset
from semilla.generate import generate
from semilla.models import build_model, count_parameters
from semilla.models.transformer import BF16_KERNELS

SHAPES = {
    "datashark-10m": preset("datashark-10m"),
    "llama-50m": ModelConfig(vocab_size=8192, block_size=512, n_layer=8, n_head=10, n_embd=640),
}
PROMPT, NEW = 64, 256


def timed(model, rows: int, use_cache: bool) -> float:
    """Seconds to generate NEW tokens for `rows` prompts of PROMPT tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(8, model.config.vocab_size, (rows, PROMPT), generator=g).tolist()
    cfg = GenerateConfig(max_new_tokens=NEW, temperature=0.0, ignore_eos=True, use_cache=use_cache)
    start = time.perf_counter()
    out = generate(model, prompts, cfg)
    elapsed = time.perf_counter() - start
    assert all(len(o.tokens) == NEW for o in out)
    return elapsed


def bench_shape(name: str, dtypes: list[str], repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(SHAPES[name]).eval()
    result = {"shape": name, "parameters": count_parameters(model)}
    for dtype in dtypes:
        model.to(getattr(torch, dtype))
        timed(model, 1, True)  # warm-up (and the weights' prepacking)
        suffix = "" if dtype == "float32" else "_bf16"
        cases = {
            "single_cached": (1, True),
            "single_uncached": (1, False),
            "batch8": (8, True),
            "batch32": (32, True),
        }
        runs = {label: [] for label in cases}
        for _ in range(repeats):  # rounds of every case: a slow spell of the machine hits them all
            for label, (rows, cache) in cases.items():
                runs[label].append(timed(model, rows, cache))
        for label, (rows, _) in cases.items():
            result[f"{label}{suffix}_tokens_per_s"] = round(rows * NEW / statistics.median(runs[label]), 1)
        result[f"cache_speedup{suffix}"] = ratio(result, f"single_cached{suffix}", f"single_uncached{suffix}")
        result[f"batch32_vs_single{suffix}"] = ratio(result, f"batch32{suffix}", f"single_cached{suffix}")
    if len(dtypes) == 2:  # the fastest batch against the fastest single stream, any dtype
        best_single = max(result["single_cached_tokens_per_s"], result["single_cached_bf16_tokens_per_s"])
        best_batch = max(result["batch32_tokens_per_s"], result["batch32_bf16_tokens_per_s"])
        result["best_batch32_vs_best_single"] = round(best_batch / best_single, 2)
    return result


def ratio(result: dict, a: str, b: str) -> float:
    return round(result[f"{a}_tokens_per_s"] / result[f"{b}_tokens_per_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), action="append")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtypes = list(dict.fromkeys(args.dtype or (["float32", "bfloat16"] if BF16_KERNELS else ["float32"])))
    results = [bench_shape(name, dtypes, args.repeats) for name in args.shape or SHAPES]
    for r in results:
        print(json.dumps(r))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "generate_speed.json").write_text(
        json.dumps({"torch_threads": torch.get_num_threads(), "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
