"""Does a LoRA adapter teach a domain without making the model worse at everything else?

    python bench/lora_domain.py '{"replay": 0.5, "lora_r": 8, "learning_rate": 3e-3}' '{...}'

A tiny llama (the `tiny` preset, block 128) trained for 600 steps on the bundled Quijote (349 KB,
about 3 epochs: not overfit), then fine-tuned with each JSON object of settings (semilla.finetune
keyword arguments, plus "replay": the share of the Quijote's training split mixed into the
fine-tune data as `clinic.jsonl:1-replay,quijote:replay`) on 200 conversations of a clinic whose
assistant always answers in one pattern (tests/test_lora_finetune.py's domain_rows). Prints, per
setting, the loss on 24 held-out conversations of the clinic (assistant turns) and on the
Quijote's validation split, each against the base model's. Work files go to --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import semilla
from semilla.checkpoint import load_checkpoint
from semilla.config import resolve_configs
from semilla.data import prepare
from semilla.evaluate import prepared_split_ids
from semilla.models.lora import load_adapter
from semilla.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_lora_finetune import domain_rows, general_loss, held_out_loss, write_jsonl  # noqa: E402

QUIJOTE = Path(__file__).resolve().parents[1] / "src" / "semilla" / "demo" / "quijote.txt"
QUIET = dict(device="cpu", progress=False, log_interval=20, sample_interval=10_000, save_interval=10_000)


def base_model(work: Path) -> tuple[Path, Path]:
    """(prepared Quijote, the base checkpoint), made once in `work`."""
    data, run = work / "data", work / "run"
    if not data.is_dir():
        prepare([str(QUIJOTE)], str(data))
    if not (run / "best").is_dir():
        settings = dict(data=str(data), out_dir=str(run), max_iters=600, eval_interval=600, warmup_iters=10,
                        block_size=128, batch_size=8, **QUIET)  # fmt: skip
        train(*resolve_configs("tiny", overrides=settings, environ={}))
    return data, run / "best"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("settings", nargs="+", help="JSON objects of fine-tune settings")
    parser.add_argument(
        "--work", default="runs/bench-lora-domain", help="work directory (kept: the base is reused)"
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, base = base_model(work)
    clinic = write_jsonl(work / "clinic.jsonl", domain_rows(200))
    held_out, ids = domain_rows(24, offset=1000), prepared_split_ids(data, "val")
    plain, tok, _ = load_checkpoint(base)
    general0, domain0 = general_loss(plain, ids), held_out_loss(plain, tok, held_out)
    print(json.dumps({"base": {"general_loss": round(general0, 4), "domain_loss": round(domain0, 4)}}))
    for text in args.settings:
        settings = {"batch_size": 8, "eval_iters": 4, "warmup_iters": 10, **QUIET, **json.loads(text)}
        replay = settings.pop("replay", 0)
        source = f"{clinic}:{1 - replay},{data}:{replay}" if replay else str(clinic)
        out = work / "adapter"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        result = semilla.finetune(base, source, out, **settings)
        tuned, _, _ = load_checkpoint(base)
        load_adapter(tuned, out)
        general, domain = general_loss(tuned, ids), held_out_loss(tuned, tok, held_out)
        print(json.dumps({
            "settings": json.loads(text), "steps": result["step"], "seconds": round(time.perf_counter() - start),
            "domain_loss": round(domain, 4), "domain_change": round(domain / domain0 - 1, 3),
            "general_loss": round(general, 4), "general_change": round(general / general0 - 1, 4),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
