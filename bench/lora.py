"""LoRA adapters on the datashark-10m shape (random weights: speed does not depend on them).

    python bench/lora.py --threads 2

1. Decode throughput of the continuous-batching engine: 16 rows spread over 8 adapters (two
   rows each, r=8 on q_proj,v_proj: semilla finetune's default; and all-linear) against 16
   rows of the base model, 64 tokens each; interleaved rounds, medians, the ratio.
2. Adapter load time: registering an r=8 adapter with the engine's bank (read the PEFT
   directory, check it against the model, lay out the bank again), median of 20.
3. Fine-tuning speed: training steps (forward, backward, AdamW) on random tokens, LoRA r=8
   against training every weight; tokens/s, interleaved rounds, medians, the ratio.
Prints one JSON object and writes bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from semilla.config import GenerateConfig, preset
from semilla.models import build_model
from semilla.models.adapter_bank import AdapterBank
from semilla.models.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from semilla.serve.engine import Engine

NEW_TOKENS = 64
ROWS = 16


def make_adapters(model, root: Path, n: int, targets: str) -> list[Path]:
    """n r=8 adapters of `model` with random B, as PEFT directories."""
    paths = []
    for i in range(n):
        copy = build_model(model.config)
        copy.load_state_dict(model.state_dict())
        apply_lora(copy, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=targets))
        with torch.no_grad():
            for layer in lora_layers(copy).values():
                layer.lora_B.weight.normal_(0.0, 0.01)
        paths.append(save_adapter(root / f"{targets}-{i}", copy, LoraConfig(8, 16, 0.0, targets), "bench"))
    return paths


async def decode_round(engine: Engine, adapters: list[str | None]) -> float:
    """Generated tokens/s of one round: len(adapters) rows at once, row i with adapters[i]."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0)
    start = time.perf_counter()
    for adapter in adapters:
        engine.submit("m", [2, 10, 11, 12], cfg, frozenset({3}), loop, queue, adapter=adapter)
    tokens = done = 0
    while done < len(adapters):
        _, event = await queue.get()
        tokens += event.token is not None
        done += event.finish_reason is not None
    return tokens / (time.perf_counter() - start)


def decode_throughput(model, root: Path, repeats: int) -> dict:
    engine = Engine(max_slots=ROWS, queue_size=64, max_adapters=16)
    engine.add_model("m", model, pad_id=0)
    mixes = {"base": [None] * ROWS}
    for targets in ("q_proj,v_proj", "all-linear"):
        names = []
        for i, path in enumerate(make_adapters(model, root, 8, targets)):
            engine.add_adapter("m", f"{targets}-{i}", path)
            names.append(f"{targets}-{i}")
        mixes[targets] = [names[i % 8] for i in range(ROWS)]  # two rows per adapter
    engine.start()
    try:
        asyncio.run(decode_round(engine, mixes["base"][:2]))  # warm-up
        rounds: dict[str, list[float]] = {k: [] for k in mixes}
        for _ in range(repeats):  # interleaved: the machine's load hits every side alike
            for kind, adapters in mixes.items():
                rounds[kind].append(asyncio.run(decode_round(engine, adapters)))
    finally:
        engine.stop()
    base = statistics.median(rounds["base"])
    out = {"base_tokens_per_s": round(base, 1)}
    for kind in ("q_proj,v_proj", "all-linear"):
        median = statistics.median(rounds[kind])
        out[f"8_adapters_{kind}_tokens_per_s"] = round(median, 1)
        out[f"8_adapters_{kind}_ratio"] = round(median / base, 3)
    return out


def load_time(model, root: Path) -> dict:
    path = make_adapters(model, root / "load", 1, "q_proj,v_proj")[0]
    bank = AdapterBank(model, max_held=1)
    times = []
    for i in range(20):
        start = time.perf_counter()
        bank.register(f"a{i}", path)  # max_held=1: the previous one leaves, the bank is laid out again
        times.append(time.perf_counter() - start)
    return {"adapter_load_ms": round(1000 * statistics.median(times), 2)}


def train_steps(model, params, steps: int, batch: int, block: int) -> float:
    """tokens/s of `steps` AdamW steps over random tokens."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    x = torch.randint(0, model.config.vocab_size, (batch, block + 1))
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch * block / (time.perf_counter() - start)


def finetune_speed(model, repeats: int) -> dict:
    full = build_model(model.config)
    full.load_state_dict(model.state_dict())
    lora = build_model(model.config)
    lora.load_state_dict(model.state_dict())
    apply_lora(lora, LoraConfig(r=8, alpha=16, dropout=0.05))
    sides = {
        "full": (full, list(full.parameters())),
        "lora": (lora, [p for p in lora.parameters() if p.requires_grad]),
    }
    rounds: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for kind, (m, params) in sides.items():
            rounds[kind].append(train_steps(m, params, steps=5, batch=8, block=256))
    full_s, lora_s = statistics.median(rounds["full"]), statistics.median(rounds["lora"])
    return {
        "full_training_tokens_per_s": round(full_s, 1),
        "lora_finetune_tokens_per_s": round(lora_s, 1),
        "finetune_ratio": round(lora_s / full_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("datashark-10m")
    model = build_model(cfg).eval()
    result = {"threads": args.threads, "shape": "datashark-10m"}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(decode_throughput(model, Path(tmp), args.repeats))
        result.update(load_time(model, Path(tmp)))
    result.update(finetune_speed(model, args.repeats))
    print(json.dumps(result))
    out = Path(__file__).with_name("results") / "lora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
