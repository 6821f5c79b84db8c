"""Command-line layer: parse flags, call the Python function, present the result.

Flags of `semilla train` are generated from the ModelConfig and TrainConfig fields, so every
setting has a flag (`n_layer` -> `--n-layer`) and they can never drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Any

from semilla.config import PRESETS, ModelConfig, TrainConfig, field_types, parse_value, resolve_configs
from semilla.errors import SemillaError

log = logging.getLogger("semilla")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    types = field_types(cls)
    for f in fields(cls):
        typ = types[f.name]
        default = f.default
        if typ is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=f"(default: {default})")
            continue

        def convert(raw: str, _typ=typ, _name=f.name) -> Any:
            try:
                return parse_value(_typ, raw)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{_flag(_name)}: {e}") from e

        group.add_argument(_flag(f.name), type=convert, default=None, metavar=f.name.upper(), help=f"(default: {default})")


def explicit_overrides(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    names = {f.name for cls in classes for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# --- commands -----------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from semilla.data import prepare

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise SemillaError(f"--split must be three comma-separated fractions like 0.8,0.1,0.1, got {args.split!r}") from None
    stats = prepare(
        args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, split=split,
        seed=args.seed, shuffle=not args.no_shuffle, tokenizer_from=args.tokenizer_from, progress=not args.quiet,
    )  # fmt: skip
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    print(f"prepared {args.out}")
    print(f"  documents        {stats['documents']:,}")
    print(f"  characters       {stats['characters']:,}")
    print(f"  tokens           {stats['tokens']:,}  ({stats['chars_per_token']} chars/token, {stats['dtype']})")
    for name, s in stats["splits"].items():
        print(f"    {name:<5}          {s['tokens']:,} tokens in {s['pieces']:,} pieces")
    print(f"  tokenizer        {stats['tokenizer']}, vocab {stats['vocab_size']:,}")
    print(f"  vocab coverage   {stats['vocab_coverage']:.2%} of tokens known, {stats['vocab_used']:.2%} of the vocab used")
    print(f"  type/token ratio {stats['type_token_ratio']:.4f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from semilla.train import resume_configs, train

    overrides = explicit_overrides(args, ModelConfig, TrainConfig)
    if args.resume:
        from semilla.config import environment_overrides, load_config_file

        merged = {**(load_config_file(args.config) if args.config else {}), **overrides, **environment_overrides()}
        model_cfg, train_cfg = resume_configs(args.resume, merged)
    else:
        model_cfg, train_cfg = resolve_configs(args.preset, args.config, overrides)
    result = train(model_cfg, train_cfg, resume=args.resume)
    summary = {k: v for k, v in result.items() if k in ("step", "loss", "val_loss", "val_ppl", "best_val_loss", "run_dir", "interrupted")}
    print(json.dumps(summary) if args.json else "done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 130 if result["interrupted"] else 0


def cmd_info(args: argparse.Namespace) -> int:
    from semilla.info import describe

    report = describe(args.target)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for k, v in report.items():
        print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}")
    return 0


# --- parser and entry point ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semilla", description="Grow your own language model from seed.")
    parser.add_argument("--version", action="version", version=f"semilla {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize text files into train/val/test shards", description="Train a tokenizer on a corpus and write memory-mapped token shards.")
    p.add_argument("inputs", nargs="+", help="text/markdown/JSONL files, folders or glob patterns")
    p.add_argument("-o", "--out", required=True, help="output directory for the prepared dataset")
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char", help="char-level or byte-level BPE (default: char)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions at document level (default: 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=42, help="seed of the document shuffle (default: 42)")
    p.add_argument("--no-shuffle", action="store_true", help="keep document order: the split is by position")
    p.add_argument("--tokenizer-from", metavar="DIR", help="reuse the tokenizer of a prepared dataset or checkpoint")
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
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly where its last checkpoint left it")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_dataclass_flags(p, ModelConfig, "model")
    add_dataclass_flags(p, TrainConfig, "training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint")
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
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
    except OSError as e:  # disk full, permission denied, ...: name the file, no traceback
        where = f" {e.filename}" if e.filename else ""
        print(f"semilla: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semilla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
