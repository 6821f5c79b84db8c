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
    DTYPE_HELP,
    DTYPES,
    PRESETS,
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
) -> None:
    """One flag per dataclass field; unset flags stay None so only explicit ones override.
    `defaults` are this command's own defaults for some fields."""
    if defaults:
        parser.set_defaults(**defaults)
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
        default = (defaults or {}).get(f.name, default)
        note = comments.get(f.name, "")
        text = f"{note} (default: {default})" if note else f"(default: {default})"
        if typ is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
            continue

        def convert(raw: str, _typ=typ, _name=f.name) -> Any:
            try:
                return parse_value(_typ, raw)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{_flag(_name)}: {e}") from e

        group.add_argument(_flag(f.name), type=convert, default=None, metavar=f.name.upper(), help=text)


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
        scrub_pii=args.scrub_pii,
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
    print(
        f"  vocab coverage   {stats['vocab_coverage']:.2%} of tokens known, {stats['vocab_used']:.2%} of the vocab used"
    )
    print(f"  type/token ratio {stats['type_token_ratio']:.4f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from semilla.train import resume_configs, train

    overrides = explicit_overrides(args, ModelConfig, TrainConfig)
    if args.resume:
        if args.preset:
            raise SemillaError(
                "--preset cannot be combined with --resume: a run keeps the model it started with"
            )
        from semilla.config import environment_overrides, load_config_file

        merged = {
            **(load_config_file(args.config) if args.config else {}),
            **overrides,
            **environment_overrides(),
        }
        model_cfg, train_cfg = resume_configs(args.resume, merged)
    else:
        model_cfg, train_cfg = resolve_configs(args.preset, args.config, overrides)
    result = train(model_cfg, train_cfg, resume=args.resume)
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
    from semilla.evaluate import evaluate, format_report

    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    settings = {
        "max_new_tokens": 100,
        "temperature": 0.8,
        "top_k": 40,
        "seed": 0,
        **_generate_settings(args),
    }
    reports = []
    for path in paths:
        lm = _load_model(path, args.dtype)
        reports.append(evaluate(
            lm, data=args.data, split=args.split, stride=args.stride, max_tokens=args.max_tokens,
            prompts=_read_prompts(args.prompts), num_samples=args.num_samples, references=args.references,
            prompt_tokens=args.prompt_tokens, reference_tokens=args.reference_tokens, cfg=lm.settings(**settings),
        ))  # fmt: skip
    result = reports[0] if len(reports) == 1 else {"compare": reports}
    if args.out:
        from semilla.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_report(reports))
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
    settings = {
        "max_new_tokens": 100,
        "temperature": 0.8,
        "top_k": 40,
        "seed": 0,
        **_generate_settings(args),
    }
    key = export_sheet(models, prompts, args.num_samples, first.settings(**settings), args.out, args.seed)
    print(f"wrote {args.out} for the raters and {key} (keep it from them)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from semilla.info import describe

    report = describe(args.target)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for k, v in report.items():
        print(
            f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}"
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
        choices=("char", "bpe"),
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
        help="reuse the tokenizer of a prepared dataset or checkpoint",
    )
    p.add_argument(
        "--scrub-pii", action="store_true", help="mask emails, phones, cards, IBANs and IPs in the corpus"
    )
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train a model from scratch (or resume a run)",
        description="Train a model. Settings: preset < --config file < flags < SEMILLA_* environment variables.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run exactly where its last checkpoint left it",
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_dataclass_flags(p, ModelConfig, "model")
    add_dataclass_flags(p, TrainConfig, "training")
    p.set_defaults(func=cmd_train)

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
    add_dataclass_flags(
        p, GenerateConfig, "sampling", skip=("stop",), defaults={"temperature": 0.8, "top_k": 40}
    )
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
    )
    add_dtype_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "eval-human", help="blind sample sheets for raters, and their scores (also: eval human)"
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
    )
    add_dtype_flag(p)
    p.set_defaults(func=cmd_eval_human)

    serve_cli.add_parser(sub)

    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint")
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from semilla.export.cli import add_parsers as add_export_parsers

    add_export_parsers(sub)  # export, import

    from semilla.serve.accounts.cli import add_parsers as add_admin_parsers

    add_admin_parsers(sub)  # admin

    from semilla.retrieval.cli import add_parsers as add_retrieval_parsers

    add_retrieval_parsers(sub)  # embed, index
    return parser


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
    args = parser.parse_args(argv)
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
