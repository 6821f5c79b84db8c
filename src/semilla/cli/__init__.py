"""Command-line layer: parse flags, call the Python function, present the result.

Each family of commands lives in its own module with an `add_parsers(sub)`: training (prepare,
train, finetune, grow), models (generate, chat, eval, info, list), serve, export/import, admin,
embed/index. Settings flags are generated from the typed configs (semilla.cli.flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from semilla.cli.flags import OneLineErrorParser
from semilla.errors import SemillaError

log = logging.getLogger("semilla")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="semilla",
        description="Grow your own language model from seed.",
        epilog="On a CPU, training and inference run semilla's own kernels, compiled with the machine's C++ compiler "
        "the first time (20-25 s, cached under ~/.cache/semilla/kernels); SEMILLA_KERNELS=0 runs "
        "PyTorch's operators instead.",
    )
    parser.add_argument("--version", action="version", version=f"semilla {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from semilla.cli import models, training
    from semilla.export.cli import add_parsers as add_export_parsers
    from semilla.learn.cli import add_parsers as add_learn_parsers
    from semilla.retrieval.cli import add_parsers as add_retrieval_parsers
    from semilla.serve import cli as serve_cli
    from semilla.serve.accounts.cli import add_parsers as add_admin_parsers

    training.add_parsers(sub)  # prepare, train, finetune, grow
    models.add_parsers(sub)  # generate, chat, eval, eval-human, info, list
    serve_cli.add_parser(sub)
    add_export_parsers(sub)  # export, import
    add_admin_parsers(sub)  # admin
    add_retrieval_parsers(sub)  # embed, index
    add_learn_parsers(sub)  # learn, learn stats
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
    args.argv = argv  # `semilla train --nproc N` runs the same command under torchrun
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
