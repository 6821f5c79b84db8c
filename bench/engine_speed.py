"""The continuous-batching engine alone, without HTTP: N sequences of 128 tokens at once.

    python bench/engine_speed.py --threads 1
    python bench/engine_speed.py --threads 2

A datashark-10m-shaped model with random weights (speed does not depend on them); every
sequence samples exactly 128 tokens. Prints tokens/s for 1 and 16 concurrent sequences
(median of 3), which bench/serve_load.py then measures again through HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from semilla.config import GenerateConfig, preset
from semilla.models import build_model
from semilla.serve.engine import Engine

NEW_TOKENS = 128


async def round_trip(engine: Engine, n: int) -> float:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0)
    start = time.perf_counter()
    for _ in range(n):
        engine.submit("m", [2, 10, 11, 12], cfg, frozenset({3}), loop, queue)
    tokens = done = 0
    while done < n:
        _, event = await queue.get()
        tokens += event.token is not None
        done += event.finish_reason is not None
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("datashark-10m")
    cfg.vocab_size = 38
    engine = Engine(max_slots=16, queue_size=64)
    engine.add_model("m", build_model(cfg).eval(), pad_id=0)
    engine.start()
    try:
        asyncio.run(round_trip(engine, 2))  # warm-up
        result = {"threads": args.threads}
        for n in (1, 16):
            result[f"{n}_sequences_tokens_per_s"] = round(
                statistics.median(asyncio.run(round_trip(engine, n)) for _ in range(args.repeats)), 1
            )
    finally:
        engine.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
