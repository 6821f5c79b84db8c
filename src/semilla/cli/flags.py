"""Flags from typed settings: every dataclass field becomes a flag (`n_layer` -> `--n-layer`), so a
setting and its flag can never drift apart; unset flags stay None so only explicit ones override."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from dataclasses import fields
from typing import Any

from semilla.config import DTYPE_HELP, DTYPES, FIELD_CHOICES, field_types, parse_value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other semilla error."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"semilla: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def flag_name(name: str) -> str:
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
                flag_name(f.name),
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
        names = [flag_name(f.name), *([aliases[f.name]] if f.name in aliases else [])]
        if typ is bool or typ == (bool | None):  # None: the setting's own automatic choice
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


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help=DTYPE_HELP,
    )
