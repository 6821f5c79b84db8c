"""Growth against training from scratch: FLOPs and wall-clock to the same validation loss.

The large model (nanoGPT's CPU recipe shape: 4 layers, 128 wide, 4 heads, block 64, batch 12,
llama family) is trained from scratch for --steps steps. The grown paths first train the small
model (2 layers, 64 wide, 2 heads: the same head size) for --small-steps steps, grow it (exact:
the same function; stack: depth by copying blocks) and train the large model for --large-steps
steps, all in one run through `semilla train --age-schedule`. Each path's cost to reach the
scratch run's final validation loss is counted in training FLOPs (3 x forward, small model's
steps included) and in wall-clock. Medians over --seeds seeds; curves to bench/grow.png.

    python bench/grow.py                      # 3 seeds, about 15 minutes on 2 cores
    python bench/grow.py --seeds 1 --steps 400 --small-steps 200 --large-steps 240   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from semilla.config import resolve_configs
from semilla.data import prepare
from semilla.models import count_parameters, flops_per_token, model_on_meta
from semilla.train import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SMALL = dict(n_embd=64, n_layer=2, n_head=2)
LARGE = dict(n_embd=128, n_layer=4, n_head=4)
RECIPE = dict(
    block_size=64, batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, eval_iters=20,
    log_interval=50, save_interval=100_000, sample_interval=100_000, device="cpu", progress=False,
)  # fmt: skip


def step_flops(shape: dict, vocab: int) -> int:
    """Training FLOPs of one step (forward + backward = 3 x forward) at the recipe's batch."""
    cfg, _ = resolve_configs(overrides={**RECIPE, **shape, "vocab_size": vocab}, environ={})
    n = count_parameters(model_on_meta(cfg))
    return 3 * flops_per_token(cfg, n) * RECIPE["batch_size"] * RECIPE["block_size"]


def curve(run: Path, start: float, flops: list[tuple[int, int]]) -> list[dict]:
    """Validation points of a run with cumulative FLOPs and seconds since it started (`start`,
    a time.time()). `flops`: (until_step, flops_per_step) segments."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    points = []
    for r in rows:
        if r["kind"] != "val":
            continue
        spent, done = 0, 0
        for until, per_step in flops:
            n = min(r["step"], until) - done
            if n > 0:
                spent, done = spent + n * per_step, done + n
        points.append({"step": r["step"], "loss": r["loss"], "flops": spent, "seconds": r["time"] - start})
    return points


def first_reaching(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["loss"] <= target), None)


def run_path(
    data: Path, out: Path, seed: int, args, schedule: list[dict] | None = None, mode: str = ""
) -> tuple[Path, float]:
    """Train one path; returns its run directory and its start time (time.time())."""
    values = {**RECIPE, **LARGE, "data": str(data), "out_dir": str(out), "seed": seed}
    values["eval_interval"] = args.eval_interval
    if schedule is None:
        values["max_iters"] = args.steps
    else:
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump({"stages": schedule}))
        values.update(age_schedule=str(path), grow_mode=mode)
        values["grow_warmup_iters"] = args.grow_warmup
    model_cfg, train_cfg = resolve_configs(overrides=values, environ={})
    start = time.time()
    train(model_cfg, train_cfg)
    print(f"  {out.name}: {time.time() - start:.1f} s", flush=True)
    return out, start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000, help="scratch run's steps (nanoGPT's recipe)")
    p.add_argument("--small-steps", type=int, default=1000)
    p.add_argument("--large-steps", type=int, default=1200)
    p.add_argument("--grow-warmup", type=int, default=50)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (default 1: steady on a shared machine)"
    )
    p.add_argument("--plot", default=str(Path(__file__).with_name("grow.png")))
    p.add_argument("--out", default=str(Path(__file__).with_name("results") / "grow.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="semilla-grow-bench-"))
    data = work / "data"
    prepare([str(DATA)], str(data), split=(0.9, 0.1, 0.0), shuffle=False)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    small_flops, large_flops = step_flops(SMALL, vocab), step_flops(LARGE, vocab)
    schedule = [
        {"name": "small", "steps": args.small_steps, **SMALL},
        {"name": "large", "steps": args.large_steps, **LARGE},
    ]
    grown_segments = [(args.small_steps, small_flops), (args.small_steps + args.large_steps, large_flops)]
    print(f"step FLOPs: small {small_flops:.3g}, large {large_flops:.3g} ({large_flops / small_flops:.1f}x)")

    results: dict[str, list[dict]] = {"scratch": [], "exact": [], "stack": []}
    for seed in range(args.seeds):
        print(f"seed {seed}", flush=True)
        scratch = curve(*run_path(data, work / f"scratch-{seed}", seed, args), [(args.steps, large_flops)])
        target = scratch[-1]["loss"]
        results["scratch"].append({"seed": seed, "target": target, "points": scratch, **scratch[-1]})
        for mode in ("exact", "stack"):
            points = curve(
                *run_path(data, work / f"{mode}-{seed}", seed, args, schedule, mode), grown_segments
            )
            hit = first_reaching(points, target)
            results[mode].append(
                {"seed": seed, "target": target, "points": points, "reached": hit, "final": points[-1]}
            )

    print(f"\nmedians over {args.seeds} seeds (target: each seed's scratch final val loss)")
    scratch_flops = statistics.median(r["flops"] for r in results["scratch"])
    scratch_s = statistics.median(r["seconds"] for r in results["scratch"])
    print(f"scratch  val {statistics.median(r['loss'] for r in results['scratch']):.4f}  "
          f"FLOPs {scratch_flops:.3g}  {scratch_s:.1f} s")  # fmt: skip
    summary = {"scratch": {"flops": scratch_flops, "seconds": scratch_s}}
    for mode in ("exact", "stack"):
        hits = [r["reached"] for r in results[mode]]
        final = statistics.median(r["final"]["loss"] for r in results[mode])
        if all(hits):
            flops = statistics.median(h["flops"] for h in hits)
            seconds = statistics.median(h["seconds"] for h in hits)
            summary[mode] = {"flops": flops, "seconds": seconds, "flops_ratio": flops / scratch_flops,
                             "time_ratio": seconds / scratch_s, "final_loss": final}  # fmt: skip
            print(f"{mode:<8} val {final:.4f}  reached at FLOPs {flops:.3g} ({flops / scratch_flops:.2f}x), "
                  f"{seconds:.1f} s ({seconds / scratch_s:.2f}x)")  # fmt: skip
        else:
            summary[mode] = {"reached": sum(map(bool, hits)), "final_loss": final}
            print(
                f"{mode:<8} val {final:.4f}  reached the target in {sum(map(bool, hits))} of {args.seeds} seeds"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args),
                                          "summary": summary, "runs": results}, indent=1))  # fmt: skip
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def plot(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"scratch": "tab:gray", "exact": "tab:green", "stack": "tab:orange"}
    for mode, runs in results.items():
        for i, r in enumerate(runs):
            pts = r["points"]
            ax.plot([p["flops"] for p in pts], [p["loss"] for p in pts], color=colors[mode], alpha=0.8,
                    label=f"{mode}" if i == 0 else None)  # fmt: skip
    target = statistics.median(r["target"] for r in results["scratch"])
    ax.axhline(target, color="black", linestyle=":", linewidth=1, label=f"scratch final {target:.3f}")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (char-level tinyshakespeare)")
    ax.set_ylim(target - 0.15, target + 0.9)
    ax.set_title("Growing 2x64 -> 4x128 against training 4x128 from scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
