"""Commands that use a trained model: generate, chat, eval, eval-human, info, list."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from semilla.cli.flags import add_dataclass_flags, add_dtype_flag, explicit_overrides
from semilla.config import CHAT_SAMPLING, EVAL_SAMPLING, PRESETS, GenerateConfig
from semilla.errors import SemillaError


def _generate_settings(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "num_samples", 1) < (0 if args.func is cmd_eval else 1):
        raise SemillaError(f"num_samples (--num-samples) must be >= 1, got {args.num_samples}")
    settings = explicit_overrides(args, GenerateConfig)
    if args.stop_string:
        settings["stop"] = args.stop_string
    return settings


def _load_model(path: str | None, dtype: str):
    from semilla.api import load

    path = path or os.environ.get("MODEL_PATH") or os.environ.get("BETA_MODEL_PATH")
    if not path:
        raise SemillaError("no checkpoint given: pass CHECKPOINT or set MODEL_PATH")
    return load(path, device=None, dtype=dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    lm = _load_model(args.checkpoint, args.dtype)
    prompt = args.prompt if args.prompt is not None else os.environ.get("PROMPT", "")
    cfg = lm.settings(**_generate_settings(args))
    if args.stream and args.num_samples == 1 and not args.json and cfg.num_beams == 1:
        sys.stdout.write(prompt)
        for piece in lm.stream_ids(lm.encode_prompt(prompt), cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    seeds = [None if cfg.seed is None else cfg.seed + i for i in range(args.num_samples)]
    start = time.perf_counter()
    completions = lm.complete([prompt] * args.num_samples, cfg, seeds)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(c.tokens) for c in completions)
    if args.json:
        print(json.dumps({
            "prompt": prompt,
            "samples": [{"text": c.text, "tokens": len(c.tokens), "finish_reason": c.finish_reason, "perplexity": c.perplexity} for c in completions],
            "prompt_tokens": completions[0].prompt_tokens,
            "completion_tokens": n_tokens,
            "seconds": round(elapsed, 4),
            "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 2),
        }, ensure_ascii=False, indent=2))  # fmt: skip
        return 0
    for i, c in enumerate(completions):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(prompt + c.text)
    print(
        f"({n_tokens} tokens in {elapsed:.2f} s, {n_tokens / max(elapsed, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from semilla.repl import run_chat

    lm = _load_model(args.checkpoint, args.dtype)
    return run_chat(lm, lm.settings(**_generate_settings(args)), args.system)


def _read_prompts(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SemillaError(f"cannot read prompts file {path}: {e.strerror}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise SemillaError(f"prompts file {path} is empty")
    return prompts


def cmd_eval(args: argparse.Namespace) -> int:
    from semilla.evaluate import compare, evaluate, format_report

    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    lms = [_load_model(path, args.dtype) for path in paths]
    options = dict(
        stride=args.stride, max_tokens=args.max_tokens, prompts=_read_prompts(args.prompts),
        num_samples=args.num_samples, references=args.references, prompt_tokens=args.prompt_tokens,
        reference_tokens=args.reference_tokens, cfg=lms[0].settings(**_generate_settings(args)),
    )  # fmt: skip
    if len(lms) == 1:
        result = evaluate(lms[0], args.data, args.split, **options)
        reports, note = [result], None
    else:
        result = compare(lms, args.data, args.split, **options)
        reports, note = result["compare"], result.get("note")
    if args.out:
        from semilla.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_report(reports, note))
    return 0


def cmd_eval_human(args: argparse.Namespace) -> int:
    from semilla.human_eval import export_sheet, score_sheets

    if args.score:
        if not args.key:
            raise SemillaError("--score needs --key (the .key.json written with the sheet)")
        print(json.dumps(score_sheets(args.score, args.key), indent=2))
        return 0
    if not args.checkpoints:
        raise SemillaError("name the checkpoints to sample from (or --score SHEETS --key KEY)")
    prompts = _read_prompts(args.prompts) or [""]
    models = {path: _load_model(path, args.dtype) for path in args.checkpoints}
    first = next(iter(models.values()))
    settings = {"seed": EVAL_SAMPLING["seed"], **_generate_settings(args)}
    key = export_sheet(models, prompts, args.num_samples, first.settings(**settings), args.out, args.seed)
    print(f"wrote {args.out} for the raters and {key} (keep it from them)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from semilla.info import describe

    report = describe(args.target)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ages = report.pop("ages", [])
    width = max(len(k) for k in report)
    for k, v in report.items():
        print(
            f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}"
        )
    if ages:
        print("\nages        step  width  layers  heads  parameters  val loss")
        for a in ages:
            print(
                f"{a['age']:<10} {a['step']:>6} {a['n_embd']:>6} {a['n_layer']:>7} {a['n_head']:>6} "
                f"{a['parameters']:>11,}  {a['val_loss']:.4f}"
            )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from semilla.runs import find_runs, human_size

    found = find_runs(args.folders)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no runs or checkpoints under {', '.join(args.folders)}")
        return 0
    width = max(len(s["path"]) for s in found)
    print(f"{'path':<{width}}  {'kind':<10}  {'steps':>7}  {'val loss':>8}  {'size':>9}")
    for s in found:
        steps = "-" if s["steps"] is None else f"{s['steps']:,}"
        loss = "-" if s["best_val_loss"] is None else f"{s['best_val_loss']:.4f}"
        print(
            f"{s['path']:<{width}}  {s['kind']:<10}  {steps:>7}  {loss:>8}  {human_size(s['size_bytes']):>9}"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """generate, chat, eval, eval-human, info, list."""
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model",
        description="Generate text. MODEL_PATH and PROMPT environment variables work too (DataShark).",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint or run directory (default: $MODEL_PATH)")
    p.add_argument("-p", "--prompt", help="text to continue (default: $PROMPT, or empty: start from <bos>)")
    p.add_argument(
        "-n",
        "--num-samples",
        type=int,
        default=1,
        help="independent continuations (sample i uses seed + i)",
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--stop-string", action="append", metavar="TEXT", help="stop before this text (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="JSON output with timing and tokens/s")
    add_dataclass_flags(p, GenerateConfig, "sampling", skip=("stop",))
    add_dtype_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="talk to a model in the terminal",
        description="Interactive chat using the chat template stored with the tokenizer. /help inside lists the commands.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint or run directory (default: $MODEL_PATH)")
    p.add_argument("--system", help="system prompt")
    p.add_argument(
        "--stop-string", action="append", metavar="TEXT", help="stop before this text (repeatable)"
    )
    add_dataclass_flags(p, GenerateConfig, "sampling", skip=("stop",), defaults=CHAT_SAMPLING)
    add_dtype_flag(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "eval",
        help="perplexity, sample quality and BLEU of a checkpoint (`eval human` for raters)",
        description="Evaluate a checkpoint: held-out perplexity/accuracy/bits per char, metrics of generated samples, "
        "BLEU/chrF against the real continuations. `semilla eval human --help` for blind human evaluation.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint or run directory (default: $MODEL_PATH)")
    p.add_argument("--compare", metavar="CHECKPOINT", help="a second checkpoint, reported side by side")
    p.add_argument("--data", help="a prepared dataset or a text file (default: the data the run trained on)")
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="split of a prepared dataset (default: test)",
    )
    p.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: the context length)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts for samples, one per line (default: start from <bos>)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=8,
        help="samples per prompt for diversity metrics (0 = skip)",
    )
    p.add_argument(
        "--references",
        type=int,
        default=16,
        help="reference continuations for BLEU/chrF (0 = skip)",
    )
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of a reference pair")
    p.add_argument("--reference-tokens", type=int, default=32, help="reference continuation length")
    p.add_argument("--stop-string", action="append", metavar="TEXT", help=argparse.SUPPRESS)
    p.add_argument("-o", "--out", metavar="FILE", help="write the JSON report here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_dataclass_flags(
        p,
        GenerateConfig,
        "sampling",
        skip=("stop", "stop_token_ids", "logprobs", "truncate", "use_cache"),
        defaults=EVAL_SAMPLING,
    )
    add_dtype_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "eval-human",
        help="blind sample sheets for raters, and their scores (also: eval human)",
        description="Blind human evaluation: write a sheet of shuffled, unlabeled samples from several "
        "checkpoints for raters to score, then --score the filled sheets against the key.",
    )
    p.add_argument("checkpoints", nargs="*", help="checkpoints to sample from")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line")
    p.add_argument("-n", "--num-samples", type=int, default=3, help="samples per prompt and checkpoint")
    p.add_argument("-o", "--out", default="human_eval.csv", help="sheet to write (.csv or .jsonl)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--score", nargs="+", metavar="SHEET", help="score filled sheets instead")
    p.add_argument("--key", help="the .key.json written with the sheet")
    p.add_argument("--stop-string", action="append", metavar="TEXT", help=argparse.SUPPRESS)
    add_dataclass_flags(
        p,
        GenerateConfig,
        "sampling",
        skip=("stop", "stop_token_ids", "logprobs", "truncate", "use_cache", "seed"),
        defaults=EVAL_SAMPLING,
    )
    add_dtype_flag(p)
    p.set_defaults(func=cmd_eval_human)

    p = sub.add_parser(
        "info",
        help="parameters, FLOPs and memory of a preset, checkpoint or run",
        description="Size, compute and memory of a preset or a checkpoint without training; for a run "
        "directory also the steps trained, the best validation loss and the size on disk.",
    )
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}), a checkpoint or a run directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "list",
        help="your runs and checkpoints: steps, validation loss, size on disk",
        description="List the run directories and checkpoints under some folders (searched recursively) "
        "with the steps trained, the best validation loss and the size on disk.",
    )
    p.add_argument("folders", nargs="*", default=["runs"], help="folders to search (default: runs)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_list)
