"""Command-line layer: parse flags, call the Python function, present the result.

Flags of `semilla train` are generated from the ModelConfig and TrainConfig fields, so every
setting has a flag (`n_layer` -> `--n-layer`) and they can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from semilla.config import (
    CHAT_SAMPLING,
    DTYPE_HELP,
    DTYPES,
    EVAL_SAMPLING,
    FIELD_CHOICES,
    PRESETS,
    SHAPE_FIELDS,
    TOKENIZERS,
    GenerateConfig,
    ModelConfig,
    TrainConfig,
    field_types,
    parse_value,
    resolve_configs,
)
from semilla.errors import SemillaError
from semilla.serve import cli as serve_cli

log = logging.getLogger("semilla")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source: the flag's help text."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """One flag per dataclass field; unset flags stay None so only explicit ones override.
    `defaults` are this command's own defaults for some fields: the flag's value unless given,
    and what its help prints. `aliases` give a field a second flag name."""
    defaults, aliases = defaults or {}, aliases or {}
    group = parser.add_argument_group(title)
    types = field_types(cls)
    comments = field_comments(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        typ = types[f.name]
        if typ == list[int]:
            group.add_argument(
                _flag(f.name),
                type=int,
                nargs="+",
                default=None,
                metavar="ID",
                help=comments.get(f.name),
            )
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name, default)
        note = comments.get(f.name, "")
        text = f"{note} (default: {default})" if note else f"(default: {default})"
        names = [_flag(f.name), *([aliases[f.name]] if f.name in aliases else [])]
        if typ is bool:
            group.add_argument(
                *names, action=argparse.BooleanOptionalAction, default=defaults.get(f.name), help=text
            )
            continue

        def convert(raw: str, _typ=typ) -> Any:
            try:
                return parse_value(_typ, raw)
            except ValueError as e:  # argparse names the flag
                raise argparse.ArgumentTypeError(str(e)) from e

        # fixed values are listed, and checked with every other setting (one error for all)
        choices = FIELD_CHOICES.get(f.name)
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
        group.add_argument(*names, type=convert, default=defaults.get(f.name), metavar=metavar, help=text)


def explicit_overrides(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    names = {f.name for cls in classes for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# --- commands -----------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from semilla.data import prepare

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise SemillaError(
            f"--split must be three comma-separated fractions like 0.8,0.1,0.1, got {args.split!r}"
        ) from None
    stats = prepare(
        args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, split=split,
        seed=args.seed, shuffle=not args.no_shuffle, tokenizer_from=args.tokenizer_from, progress=not args.quiet,
        scrub_pii=args.scrub_pii, encoding=args.encoding, overwrite=args.overwrite,
    )  # fmt: skip
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    print(f"prepared {args.out}")
    print(f"  documents        {stats['documents']:,}")
    print(f"  characters       {stats['characters']:,}")
    print(
        f"  tokens           {stats['tokens']:,}  ({stats['chars_per_token']} chars/token, {stats['dtype']})"
    )
    for name, s in stats["splits"].items():
        print(f"    {name:<5}          {s['tokens']:,} tokens in {s['pieces']:,} pieces")
    print(f"  tokenizer        {stats['tokenizer']}, vocab {stats['vocab_size']:,}")
    if stats["loss_mask"]:
        print("  loss mask        chat rows train on their assistant turns (--loss-on all: every token)")
    print(
        f"  vocab coverage   {stats['vocab_coverage']:.2%} of tokens known, {stats['vocab_used']:.2%} of the vocab used"
    )
    print(f"  type/token ratio {stats['type_token_ratio']:.4f}")
    for path, encoding in stats["encodings"].items():
        print(f"  {'read as ' + encoding:<16} {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from semilla.config import environment_overrides, load_config_file
    from semilla.train import resume_configs, train
    from semilla.train_inputs import init_model_config

    overrides = explicit_overrides(args, ModelConfig, TrainConfig)
    merged = {
        **(load_config_file(args.config) if args.config else {}),
        **overrides,
        **environment_overrides(),
    }
    if args.resume:
        if args.preset:
            raise SemillaError(
                "--preset cannot be combined with --resume: a run keeps the model it started with"
            )
        if merged.get("init_from"):
            raise SemillaError(
                "--resume and --init-from cannot be combined: --resume continues a run exactly, "
                "--init-from starts a new run from a checkpoint's weights"
            )
        model_cfg, train_cfg = resume_configs(args.resume, merged)
    else:
        model_cfg, train_cfg = resolve_configs(args.preset, args.config, overrides)
        if train_cfg.init_from:
            if merged.get("preset") or args.preset:
                raise SemillaError(
                    "--preset cannot be combined with --init-from: the model comes from the checkpoint"
                )
            model_cfg = init_model_config(train_cfg.init_from, merged)
    result = train(model_cfg, train_cfg, resume=args.resume, overwrite=args.overwrite)
    summary = {
        k: v
        for k, v in result.items()
        if k in ("step", "loss", "val_loss", "val_ppl", "best_val_loss", "run_dir", "interrupted")
    }
    print(
        json.dumps(summary)
        if args.json
        else "done: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    )
    return 130 if result["interrupted"] else 0


LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
AGE_FIELDS = (
    "ages",
    "target_age",
    "steps_per_age",
    "age_scale",
    "age_schedule",
    "grow_mode",
    "grow_warmup_iters",
)


def cmd_finetune(args: argparse.Namespace) -> int:
    from semilla.finetuning import finetune

    settings = explicit_overrides(args, TrainConfig)
    data, out = settings.pop("data", None), settings.pop("out_dir", None)
    if args.resume:
        if args.checkpoint or data or out:
            raise SemillaError(
                "--resume RUN_DIR continues a fine-tune as it was: drop CHECKPOINT, --data and -o"
            )
        settings = {
            k: v for k, v in settings.items() if k not in LORA_FIELDS
        }  # the run keeps its adapter's shape
        result = finetune(None, "", args.resume, resume=True, **settings)
    else:
        missing = [
            name
            for name, value in (("CHECKPOINT", args.checkpoint), ("--data", data), ("-o", out))
            if not value
        ]
        if missing:
            raise SemillaError(f"semilla finetune needs {', '.join(missing)} (or --resume RUN_DIR)")
        result = finetune(args.checkpoint, data, out, overwrite=args.overwrite, **settings)
    summary = {
        k: v
        for k, v in result.items()
        if k in ("step", "loss", "val_loss", "best_val_loss", "adapter", "interrupted")
    }
    print(
        json.dumps(summary)
        if args.json
        else "done: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    )
    return 130 if result["interrupted"] else 0


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


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help=DTYPE_HELP,
    )


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


def _insert_position(raw: str) -> str | int:
    if raw in ("end", "interleave"):
        return raw
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--insert: end, interleave or a layer index, got {raw!r}") from None


def cmd_grow(args: argparse.Namespace) -> int:
    from semilla.models.grow import grow_checkpoint

    dims = {name: getattr(args, name) for name in SHAPE_FIELDS}
    if not args.preset and all(v is None for v in dims.values()):
        raise SemillaError(
            "say what to grow to: --preset P or at least one of --n-embd --n-layer --n-head "
            "--n-kv-head --intermediate-size --block-size"
        )
    result = grow_checkpoint(
        args.checkpoint, args.out, mode=args.mode, noise=args.noise, insert=args.insert, seed=args.seed,
        overwrite=args.overwrite, preset=args.preset, **dims,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name in ("source", "grown"):
        part = result[name]
        print(f"{name:<7} {part['shape']}: {part['parameters']:,} parameters")
    verdict = "exact: same function" if result["exact"] else "not function-preserving"
    print(
        f"wrote {result['path']} ({result['mode']} mode, {verdict}; "
        f"largest logit change on a random batch {result['max_logit_change']:.2e})"
    )
    return 0


# --- parser and entry point ---------------------------------------------------------------


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other semilla error."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"semilla: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="semilla",
        description="Grow your own language model from seed.",
        epilog="On a CPU, inference runs semilla's own kernels, compiled with the machine's C++ compiler "
        "the first time (20-25 s, cached under ~/.cache/semilla/kernels); SEMILLA_KERNELS=0 runs "
        "PyTorch's operators instead.",
    )
    parser.add_argument("--version", action="version", version=f"semilla {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="tokenize text files into train/val/test shards",
        description="Train a tokenizer on a corpus and write memory-mapped token shards.",
    )
    p.add_argument("inputs", nargs="+", help="text/markdown/JSONL files, folders or glob patterns")
    p.add_argument("-o", "--out", required=True, help="output directory for the prepared dataset")
    p.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="char",
        help="char-level or byte-level BPE (default: char)",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    p.add_argument(
        "--split",
        default="0.8,0.1,0.1",
        help="train,val,test fractions at document level (default: 0.8,0.1,0.1)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the document shuffle (default: 42)")
    p.add_argument("--no-shuffle", action="store_true", help="keep document order: the split is by position")
    p.add_argument(
        "--tokenizer-from",
        metavar="DIR",
        help="reuse the tokenizer of a prepared dataset, a checkpoint or a run directory",
    )
    p.add_argument(
        "--scrub-pii", action="store_true", help="mask emails, phones, cards, IBANs and IPs in the corpus"
    )
    p.add_argument(
        "--encoding",
        help="text encoding of the files, e.g. cp1252 (default: UTF-8, and files that are not UTF-8 "
        "are read as cp1252 or latin-1, with a warning naming each)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train a model from scratch, from a checkpoint (--init-from), or resume a run",
        description="Train a model. Settings: preset < --config file < flags < SEMILLA_* environment variables. "
        "--init-from CKPT starts a new run from a checkpoint's weights and tokenizer (fresh optimizer and "
        "schedule; the model's shape is the checkpoint's); --resume RUN_DIR continues a run exactly. "
        'JSONL chat rows ({"messages": [...]}) train on the assistant turns only (--loss-on all: every token). '
        "--data new:0.7,old:0.3 draws each batch's rows from several datasets by weight.",
    )
    p.add_argument("--preset", choices=list(PRESETS), help="model preset")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run exactly where its last checkpoint left it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --out-dir that holds a run, deleting its checkpoints and metrics",
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    # the model's vocabulary is always the tokenizer's: --vocab-size is the BPE size, as in prepare
    add_dataclass_flags(p, ModelConfig, "model", skip=("vocab_size",))
    add_dataclass_flags(p, TrainConfig, "training", aliases={"vocab_size_bpe": "--vocab-size"})
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="train a LoRA adapter for a checkpoint on chats or text (PEFT format)",
        description="Train a LoRA adapter: the checkpoint's weights stay frozen, low-rank adapters on "
        "--target-modules learn from --data (chat JSONL rows train on their assistant turns). The output "
        "directory is a PEFT adapter (adapter_config.json, adapter_model.safetensors: the best on the "
        "held-out split) and the run's last/, metrics.jsonl and tb/; --resume OUT continues it.",
    )
    p.add_argument("checkpoint", nargs="?", help="the base model: a checkpoint or run directory")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a fine-tune where its last checkpoint left it"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the adapter and run in the output directory"
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_dataclass_flags(
        p, TrainConfig, "fine-tuning", skip=("init_from", "tokenizer", "vocab_size_bpe", *AGE_FIELDS),
        defaults={"lora_r": 8, "out_dir": None}, aliases={"out_dir": "-o"},
    )  # fmt: skip
    p.set_defaults(func=cmd_finetune)

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

    serve_cli.add_parser(sub)

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

    p = sub.add_parser(
        "grow",
        help="grow a trained model: wider, deeper, more heads, longer context",
        description="Grow a checkpoint into a larger model that computes the same function (mode exact): "
        "same logits for every input, up to float rounding (about 1e-6), then train it on. "
        "Exact for the llama family in every dimension (width, MLP, heads, key/value heads, depth, context) "
        "and for the gpt2 family too: zero padding alone would move LayerNorm's mean and variance (in the tests, "
        "logits off by as much as their own size), so in the gpt2 family the new width coordinates carry the mean of "
        "the old ones. New weights that read the "
        "stream are random (small), the ones that write into it start at zero (--noise perturbs them; then "
        "not exact). Mode stack grows depth by copying existing blocks (G_stack): not function-preserving. "
        "Dimensions not given stay the source's; n_head follows n_embd at the same head size. LSTM and int8 "
        "checkpoints cannot grow.",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory to grow")
    p.add_argument("-o", "--out", required=True, help="directory of the grown checkpoint")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="grow to this preset's shape (e.g. thau-age-3); the vocabulary stays",
    )
    for name in SHAPE_FIELDS:
        p.add_argument(_flag(name), type=int, metavar="N", help=f"grown {name} (overrides the preset's)")
    p.add_argument(
        "--mode",
        choices=("exact", "stack"),
        default="exact",
        help="exact: new blocks are identities (default); stack: new blocks copy old ones (G_stack)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="perturb the values that keep the function (zeros, gpt2 means) by this standard deviation "
        "(then not exact)",
    )
    p.add_argument(
        "--insert",
        type=_insert_position,
        default="end",
        metavar="end|interleave|N",
        help="where new blocks go: after the old ones, spread between them, or before old block N (default: end)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the new random weights (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_grow)

    from semilla.export.cli import add_parsers as add_export_parsers

    add_export_parsers(sub)  # export, import

    from semilla.serve.accounts.cli import add_parsers as add_admin_parsers

    add_admin_parsers(sub)  # admin

    from semilla.retrieval.cli import add_parsers as add_retrieval_parsers

    add_retrieval_parsers(sub)  # embed, index
    return parser


def unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> str:
    """argparse's message for unknown arguments, with the closest flag of the command."""
    import difflib

    message = f"unrecognized arguments: {' '.join(unknown)}"
    command = parser
    for action in parser._actions:  # argparse keeps its subcommands here and nowhere public
        if isinstance(action, argparse._SubParsersAction) and getattr(args, "command", None):
            command = action.choices.get(args.command, parser)
    flags = [f for f in command._option_string_actions if f.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.6)
            if close:
                return f"{message} (did you mean {close[0]}?)"
    return message


def _version() -> str:
    from semilla import __version__

    return __version__


class _OneLineWarnings(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno == logging.WARNING else ""
        return prefix + record.getMessage()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "human"]:  # `semilla eval human ...` is the eval-human command
        argv = ["eval-human", *argv[2:]]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unrecognized(parser, args, unknown))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineWarnings())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler], force=True)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SemillaError as e:
        print(f"semilla: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `semilla ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, permission denied, ...: name the file, no traceback
        where = f" {e.filename}:" if e.filename else ""
        print(f"semilla: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semilla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
