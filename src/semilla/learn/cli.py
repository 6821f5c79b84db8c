"""`semilla learn RUN ...` and `semilla learn stats RUN`: parse flags, call learn(), print."""

from __future__ import annotations

import argparse
import json

from semilla.cli.flags import add_dataclass_flags, explicit_overrides
from semilla.errors import SemillaError
from semilla.learn.config import LearnConfig


def cmd_learn(args: argparse.Namespace) -> int:
    if len(args.target) == 2 and args.target[0] == "stats":
        return print_stats(args.target[1], args.json)
    if len(args.target) != 1:
        raise SemillaError("give one run directory: semilla learn RUN ... or semilla learn stats RUN")
    from semilla.learn import learn
    from semilla.learn.teacher import provider_settings

    settings = explicit_overrides(args, LearnConfig)
    if args.teacher:
        try:
            settings = {**provider_settings(args.teacher), **settings}
        except ValueError as e:
            raise SemillaError(str(e)) from None
    if args.uncertainty_markers is not None:
        settings["uncertainty_markers"] = [
            m.strip() for m in args.uncertainty_markers.split(",") if m.strip()
        ]
    if args.rounds < 1:
        raise SemillaError(f"--rounds must be >= 1, got {args.rounds}")
    result = learn(
        args.target[0], rounds=args.rounds, forever=args.forever, wait=args.wait or None, **settings
    )
    for r in result["rounds"]:
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("round", "status"))
        print(json.dumps(r) if args.json else f"round {r['round']}: {r['status']} ({details})")
    if not args.json:
        print(f"current model: {result['current']}")
        if "adapter" in result:
            print(f"adapter: {result['adapter']}")
    return 0


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_stats(run: str, as_json: bool) -> int:
    from semilla.learn import learn_stats

    stats = learn_stats(run)
    if as_json:
        print(json.dumps(stats, indent=2))
        return 0
    for key in ("rounds", "questions_asked", "gaps_detected", "teacher_invalid", "datasets_generated",
                "examples_generated", "promotions", "rollbacks", "train_steps"):  # fmt: skip
        print(f"{key.replace('_', ' '):<20} {stats[key]}")
    ages = ", ".join(f"age {g['age']} after round {g['after_round']}" for g in stats["growths"])
    print(f"{'growths':<20} {len(stats['growths'])}{f' ({ages})' if ages else ''}")
    print("round  status        questions  gaps  examples  recall  val_ppl")
    for r in stats["per_round"]:
        recall = f"{r['recall']:.2f}" if "recall" in r else "-"
        ppl = f"{r['val_ppl']:.3f}" if "val_ppl" in r else "-"
        print(
            f"{r['round']:<6} {r['status']:<13} {r['questions']:<10} {r['gaps']:<5} {r['examples']:<9} {recall:<7} {ppl}"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """learn (and learn stats)."""
    p = sub.add_parser(
        "learn",
        help="self-learning: the model questions itself, a teacher fills its gaps, a gate keeps it honest",
        description="Each round the model answers questions made from the seed's templates and concepts "
        "(--topics, or its corpus's frequent words); answers that are short, unsure, improbable or "
        "inconsistent are gaps, and a teacher (OpenAI- or Anthropic-compatible) writes examples for each (kept as chat "
        "JSONL under RUN/datasets/auto_generated/). A candidate trained from the current model on them, "
        "with at least half original data replayed, is promoted (RUN/learn/best) only if it recalls more "
        "of the teacher's facts, keeps earlier ones, and its original validation perplexity rises at most "
        "--max-ppl-rise. --into-adapter DIR trains a LoRA adapter there instead (the base model kept; the "
        "gate judges base + adapter; a rejected round leaves the adapter as it was). Limits: 10 questions an hour, 100 a day, 30 s apart unless set otherwise; they "
        "persist in the run. Ctrl-C or a crash loses nothing: the next run resumes the round. "
        "--grow-on-plateau: after --plateau-rounds rolled-back rounds in a row the model grows to the next THAU "
        "age (function-preserving) and learning goes on with it. "
        "`semilla learn stats RUN`: gaps, datasets, examples, promotions, rollbacks, growths, recall per round.",
    )
    p.add_argument("target", nargs="+", metavar="RUN", help="the run directory (or: stats RUN)")
    p.add_argument("--teacher", metavar="PROVIDER/MODEL",
                   help="ollama/MODEL, llamacpp/MODEL, vllm/MODEL, semilla/MODEL, openai/MODEL or "
                   "anthropic/MODEL (their default URL; openai reads OPENAI_API_KEY, anthropic ANTHROPIC_API_KEY "
                   "and speaks the Messages API)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="rounds to run (default: 1)")
    p.add_argument(
        "--forever", action="store_true", help="run rounds until interrupted, waiting for the limits"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="when a question limit is reached, wait for it (default: end the round)",
    )
    p.add_argument(
        "--uncertainty-markers", metavar="A,B", help="phrases that make an answer a gap (comma-separated)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_dataclass_flags(p, LearnConfig, "learning", skip=("uncertainty_markers",))
    p.set_defaults(func=cmd_learn)
