"""Constrained decoding cost: the engine's tokens/s with and without a JSON schema, side by side.

    python bench/constrained.py --threads 2

A datashark-10m-shaped model (random weights: speed does not depend on them) with a byte-level
BPE tokenizer of 4,096 tokens trained on the bundled Quijote, so the token mask has a real
vocabulary to cover. Every sequence samples exactly 128 tokens: free ones hold their stop token
back (min_tokens), constrained ones follow a schema of a long list of integers, which never
lets them end sooner. Rounds alternate free and constrained (interleaved, so the machine's load
hits both alike) for 1 and 16 concurrent sequences; prints the medians and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from semilla.config import GenerateConfig, preset
from semilla.models import build_model
from semilla.serve.engine import Engine
from semilla.serve.structured import Grammars, OutputFormat
from semilla.tokenizer import Tokenizer

NEW_TOKENS = 128
DEMO_TEXT = Path(__file__).resolve().parents[1] / "src" / "semilla" / "demo" / "quijote.txt"
SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}


async def round_trip(engine: Engine, n: int, grammars: Grammars | None, grammar: str | None) -> float:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0)
    start = time.perf_counter()
    for _ in range(n):
        rules = (grammars.rule(grammar),) if grammar else ()  # made per request, as a route does
        engine.submit("m", [2, 10, 11, 12], cfg, frozenset({3}), loop, queue, rules=rules)
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
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = Tokenizer.train_bpe([DEMO_TEXT.read_text(encoding="utf-8")], vocab_size=4096)
    cfg = preset("datashark-10m")
    cfg.vocab_size = tok.vocab_size
    grammars = Grammars(tok)
    grammar = grammars.compile(OutputFormat(SCHEMA, "bench"))
    engine = Engine(max_slots=16, queue_size=64)
    engine.add_model("m", build_model(cfg).eval(), pad_id=0)
    engine.start()
    result = {"threads": args.threads, "vocab": tok.vocab_size, "rounds": args.rounds}
    try:
        asyncio.run(round_trip(engine, 2, grammars, grammar))  # warm-up
        for n in (1, 16):
            free, constrained = [], []
            for r in range(args.rounds):
                pair = [(free, None), (constrained, grammar)]
                for out, g in pair if r % 2 == 0 else pair[::-1]:
                    out.append(asyncio.run(round_trip(engine, n, grammars, g)))
            free_s, constrained_s = statistics.median(free), statistics.median(constrained)
            result[f"{n}_sequences"] = {
                "free_tokens_per_s": round(free_s, 1),
                "json_schema_tokens_per_s": round(constrained_s, 1),
                "ratio": round(constrained_s / free_s, 3),
            }
    finally:
        engine.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
