"""`--help` tells the truth: the defaults it prints are the ones the command uses, every flag
says what it does, fixed choices are listed, and a mistyped flag or value gets one clear line.

The one-line errors run cli.main in the test process (cli_in_process): each subprocess would
import torch again to print one line; the chat and eval checks run as a user runs them."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, clean_env, run_cli

from semilla.cli import build_parser
from semilla.config import MLPS, NORMS, POSITIONS, PRESETS, SCHEDULES, TOKENIZERS, GenerateConfig
from semilla.repl import ChatSession


def command(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def help_defaults(name: str) -> dict[str, str]:
    """{field: the default its --help prints} for the sampling flags of a command."""
    fields = set(GenerateConfig.__dataclass_fields__)
    found = {}
    for action in command(name)._actions:
        dest, text = action.dest, action.help or ""
        m = re.search(r"\(default: ([^)]*)\)$", text)
        if dest in fields and m:
            found[dest] = m.group(1)
    return found


def test_chat_uses_the_sampling_its_help_prints(tiny_run: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "semilla", "chat", str(tiny_run)],
        input="/settings\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    shown = dict(re.findall(r"^(?:> )?\s+(\w+) = (.*)$", proc.stdout, re.M))  # after the "> " prompt
    printed = help_defaults("chat")
    assert printed["temperature"] == "0.8" and printed["top_k"] == "40"
    for field, default in printed.items():
        assert shown[field] == default, field


def test_eval_uses_the_sampling_its_help_prints(tiny_run: Path) -> None:
    proc = run_cli(
        "eval",
        tiny_run,
        "--json",
        "--num-samples",
        "1",
        "--references",
        "0",
        "--max-tokens",
        "40",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    used = json.loads(proc.stdout)["settings"]
    printed = help_defaults("eval")
    assert printed["max_new_tokens"] == "100" and printed["seed"] == "0"
    for field in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        assert str(used[field]) == printed[field], field


def test_every_train_flag_says_what_it_does() -> None:
    vague = [
        a.option_strings[0]
        for a in command("train")._actions
        if a.option_strings and a.help != argparse.SUPPRESS and (not a.help or a.help.startswith("(default"))
    ]
    assert vague == []


@pytest.mark.parametrize(
    "flag, choices",
    [
        ("--norm", NORMS),
        ("--pos", POSITIONS),
        ("--mlp", MLPS),
        ("--arch", ("transformer", "lstm")),
        ("--tokenizer", TOKENIZERS),
        ("--lr-schedule", SCHEDULES),
    ],
)
def test_flags_with_fixed_values_list_them(flag: str, choices: tuple[str, ...]) -> None:
    action = command("train")._option_string_actions[flag]
    assert action.metavar == "{" + ",".join(choices) + "}"
    assert f"{flag} {action.metavar}" in command("train").format_help()


def test_a_value_outside_the_choices_is_refused_with_the_list(
    prepared_dir: Path, tmp_path: Path, cli_in_process
) -> None:
    proc = cli_in_process(
        "train", "--data", prepared_dir, "--out-dir", tmp_path / "run", "--norm", "batchnorm"
    )
    assert_one_line_error(proc, "norm must be one of", "rmsnorm", "layernorm", "batchnorm")


def test_presets_are_listed_in_their_own_order() -> None:
    choices = command("train")._option_string_actions["--preset"].choices
    assert list(choices) == list(PRESETS)
    assert choices.index("thau-age-3") < choices.index("thau-age-12")


def test_vocab_size_means_the_bpe_size_in_train_as_in_prepare() -> None:
    args = build_parser().parse_args(["train", "--vocab-size", "300"])
    assert args.vocab_size_bpe == 300
    assert not hasattr(args, "vocab_size")


def test_a_bad_number_names_the_flag_once(cli_in_process) -> None:
    line = assert_one_line_error(
        cli_in_process("train", "--n-layer", "two"), "expected an integer, got 'two'"
    )
    assert line.count("--n-layer") == 1, line


def test_a_bad_chat_setting_is_one_plain_sentence(tiny_run: Path) -> None:
    from semilla.api import load

    session = ChatSession(load(str(tiny_run)), GenerateConfig())
    assert session.command("/set temperature abc") == "error: expected a number, got 'abc'"


def test_an_unknown_flag_suggests_the_closest(cli_in_process) -> None:
    assert_one_line_error(
        cli_in_process("train", "--lerning-rate", "0.1"), "--lerning-rate", "did you mean --learning-rate?"
    )


def test_resume_of_a_checkpoint_inside_a_run_says_to_pass_the_run(
    tmp_path: Path, tiny_run: Path, cli_in_process
) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "mine"))
    assert_one_line_error(cli_in_process("train", "--resume", run / "last"), "not a run", f"--resume {run}")


def test_eval_of_a_folder_that_is_not_a_dataset_says_so(
    tmp_path: Path, tiny_run: Path, cli_in_process
) -> None:
    (tmp_path / "texts").mkdir()
    proc = cli_in_process("eval", tiny_run, "--data", tmp_path / "texts")
    assert_one_line_error(proc, "is a folder but not a prepared dataset")


@pytest.mark.parametrize("name", ["info", "eval-human", "admin", "list"])
def test_every_command_has_a_description(name: str) -> None:
    assert command(name).description


def test_serve_writes_defaults_like_the_rest() -> None:
    text = command("serve").format_help()
    assert "(default 8000" not in text and "(default: 8000" in text


def test_the_command_line_starts_without_the_server_stack() -> None:
    """Building every command's parser imports neither the web framework nor the database
    layer: `semilla train` or `semilla --help` must not wait for (or need) the server's
    libraries; the server and the admin commands import them when they run."""
    import subprocess
    import sys

    code = (
        "import sys; from semilla.cli import build_parser; build_parser(); "
        "print(' '.join(m for m in ('fastapi', 'starlette', 'sqlalchemy', 'uvicorn') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=True
    )
    assert proc.stdout.strip() == ""
