"""Commands that make models: prepare, train, finetune, grow."""

from __future__ import annotations

import argparse
import datetime
import json

from semilla.cli.flags import add_dataclass_flags, explicit_overrides, flag_name
from semilla.config import PRESETS, SHAPE_FIELDS, TOKENIZERS, ModelConfig, TrainConfig, resolve_configs
from semilla.errors import SemillaError


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


def report_run(result: dict, as_json: bool, extra: tuple[str, ...]) -> int:
    """Print a finished (or interrupted) run's summary; the exit code says which it was."""
    keys = ("step", "loss", "val_loss", *extra, "best_val_loss", "interrupted")
    summary = {k: v for k, v in result.items() if k in keys}
    print(
        json.dumps(summary)
        if as_json
        else "done: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    )
    return 130 if result["interrupted"] else 0


def cmd_train(args: argparse.Namespace) -> int:
    from semilla.config import environment_overrides, load_config_file
    from semilla.distributed import world_from_env
    from semilla.train import train
    from semilla.train_inputs import init_model_config
    from semilla.train_setup import resume_configs

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
    if args.nproc:
        return launch_processes(args, train_cfg)
    result = train(model_cfg, train_cfg, resume=args.resume, overwrite=args.overwrite)
    if not world_from_env().main:  # one summary per run, from rank 0
        return 130 if result["interrupted"] else 0
    return report_run(result, args.json, ("val_ppl", "run_dir"))


def launch_processes(args: argparse.Namespace, train_cfg: TrainConfig) -> int:
    """`semilla train --nproc N ...`: the same command as N processes under torchrun."""
    from semilla.distributed import World, check_batch_split, launch

    if args.nproc < 1:
        raise SemillaError(f"--nproc must be >= 1, got {args.nproc}")
    check_batch_split(World(size=args.nproc), train_cfg.grad_accum)  # one clear error, before N start
    argv, skip = [], False
    for arg in args.argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    return launch(args.nproc, argv)


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


DB_FILTERS = ("domain", "user", "positive_only", "since", "until")


def iso_date(raw: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a date is YYYY-MM-DD, got {raw!r}") from None


def conversations_from_db(args: argparse.Namespace, directory: str) -> str:
    """The conversations --from-db and its filters select, written as chat JSONL in `directory`."""
    from semilla.serve.accounts.domains import ConversationFilter, export_conversations

    def midnight(day: datetime.date | None, days: int = 0) -> datetime.datetime | None:
        return (
            None
            if day is None
            else datetime.datetime.combine(day, datetime.time()) + datetime.timedelta(days)
        )

    where = ConversationFilter(
        domain=args.domain.strip().casefold() if args.domain else None, username=args.user,
        positive_only=args.positive_only, since=midnight(args.since), until=midnight(args.until, 1),
    )  # fmt: skip
    path = f"{directory}/conversations.jsonl"
    if not export_conversations(args.from_db, where, path):
        chosen = ", ".join(
            f"--{n.replace('_', '-')} {getattr(args, n)}" for n in DB_FILTERS if getattr(args, n)
        )
        raise SemillaError(f"--from-db: no conversation in the database matches {chosen or 'at all'}")
    return path


def domain_rows(data: str, domain: str, directory: str) -> str:
    """The rows of --data's JSONL files tagged {"domain": DOMAIN} (case-insensitive), written
    as one JSONL file in `directory`."""
    from pathlib import Path

    wanted, kept = domain.strip().casefold(), []
    for path in [p for p in data.split(",") if p]:
        if not path.endswith(".jsonl") or not Path(path).is_file():
            raise SemillaError(
                f"--domain picks the rows of JSONL files tagged with it: {path} is not a .jsonl file"
            )
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SemillaError(f"{path}:{number}: not JSON ({e})") from None
                if isinstance(row, dict) and str(row.get("domain", "")).strip().casefold() == wanted:
                    kept.append(line.rstrip("\n") + "\n")
    if not kept:
        raise SemillaError(f'--domain {domain}: no row of {data} is tagged with it ("domain": "{wanted}")')
    out = Path(directory) / "domain.jsonl"
    out.write_text("".join(kept), encoding="utf-8")
    return str(out)


def cmd_finetune(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="semilla-from-db-") as scratch:
        return finetune_command(args, scratch)


def finetune_command(args: argparse.Namespace, scratch: str) -> int:
    from semilla.finetuning import finetune

    settings = explicit_overrides(args, TrainConfig)
    data, out = settings.pop("data", None), settings.pop("out_dir", None)
    filters = [n for n in DB_FILTERS if n != "domain" and getattr(args, n)]
    if filters and not args.from_db:
        raise SemillaError(
            f"--{filters[0].replace('_', '-')} filters the conversations of --from-db URL: give it"
        )
    # either source is prepared into the run: a resume needs the scratch file no more
    if args.from_db:
        if data or args.resume:
            raise SemillaError("--from-db URL is the training data: drop --data (and --resume)")
        data = conversations_from_db(args, scratch)
    elif args.domain:
        if not data:
            raise SemillaError(
                "--domain picks rows of --data's JSONL files or conversations of --from-db: give one"
            )
        data = domain_rows(data, args.domain, scratch)
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
    return report_run(result, args.json, ("adapter",))


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """prepare, train, finetune, grow."""
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
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train as N processes on this machine (DDP through torchrun: gloo on CPU, one GPU each "
        "on CUDA); --grad-accum is the global number of micro-batches and must be a multiple of N. "
        "Several machines: torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m semilla train ...",
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
        "held-out split) and the run's last/, metrics.jsonl and tb/; --resume OUT continues it. "
        "--data chats.jsonl:0.3,runs/mine/data:0.7 mixes the model's own training data back in (replay), "
        "which keeps what it knew: see bench/README.md.",
    )
    p.add_argument("checkpoint", nargs="?", help="the base model: a checkpoint or run directory")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a fine-tune where its last checkpoint left it"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the adapter and run in the output directory"
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    db = p.add_argument_group(
        "conversations from the server's database",
        "--from-db URL trains on the conversations `semilla serve` stored (its database URL: "
        "sqlite:///semilla-data/semilla.db or postgresql://...), chosen by the filters below; it only reads",
    )
    db.add_argument("--from-db", metavar="URL", help="the server's database URL (instead of --data)")
    db.add_argument(
        "--domain",
        help="only conversations tagged with this domain (the chat's domain picker); with --data, only the JSONL "
        'rows tagged {"domain": DOMAIN}',
    )
    db.add_argument("--user", metavar="USERNAME", help="only this account's conversations")
    db.add_argument("--positive-only", action="store_true", help="only conversations rated up and never down")
    db.add_argument(
        "--since", type=iso_date, metavar="YYYY-MM-DD", help="only those changed on or after this day"
    )
    db.add_argument(
        "--until", type=iso_date, metavar="YYYY-MM-DD", help="only those changed on or before this day"
    )
    add_dataclass_flags(
        p, TrainConfig, "fine-tuning", skip=("init_from", "tokenizer", "vocab_size_bpe", *AGE_FIELDS),
        defaults={"lora_r": 8, "out_dir": None}, aliases={"out_dir": "-o"},
    )  # fmt: skip
    p.set_defaults(func=cmd_finetune)

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
        p.add_argument(flag_name(name), type=int, metavar="N", help=f"grown {name} (overrides the preset's)")
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
