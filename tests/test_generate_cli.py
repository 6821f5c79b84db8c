"""`semilla generate` as a user runs it: flags, environment variables, output and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from generation_helpers import char_tokenizer, tiny_model
from helpers import assert_one_line_error, clean_env, run_cli

import semilla
from semilla.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = char_tokenizer()
    path = tmp_path_factory.mktemp("generate_cli") / "ckpt"
    save_checkpoint(path, tiny_model(tok), tok)
    return path


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
        (["--top-k", "-1"], "top_k must be >= 0, got -1"),
        (["--max-new-tokens", "0"], "max_new_tokens must be in [1, 1000000], got 0"),
        (["--max-new-tokens", "10000000"], "got 10000000"),
        (["--min-new-tokens", "9", "--max-new-tokens", "5"], "min_new_tokens"),
        (["-n", "0"], "num_samples"),
        (["--prompt", "€€€"], "<unk>"),
    ],
)
def test_bad_settings_are_one_line_errors(checkpoint, cli_in_process, flags, needle):
    proc = cli_in_process("generate", checkpoint, "--prompt", "the", *flags)
    code, err = proc.returncode, proc.stderr.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("semilla: error:") and needle in err[0], err


# The same through a real process, once per kind of failure: flag, text, checkpoint.


def test_a_bad_flag_is_a_one_line_error_from_the_command(checkpoint):
    proc = run_cli("generate", checkpoint, "--prompt", "the", "--top-p", "1.5")
    assert_one_line_error(proc, "top_p must be in (0, 1], got 1.5")


def test_a_prompt_of_only_unknown_characters_is_a_one_line_error(checkpoint):
    proc = run_cli("generate", checkpoint, "--prompt", "€€€")
    assert_one_line_error(proc, "<unk>")


def test_a_checkpoint_from_a_newer_semilla_is_a_one_line_error(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    config["format_version"] = 999
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    proc = run_cli("generate", tmp_path / "new", "--prompt", "the")
    assert_one_line_error(proc, "format 999", "upgrade semilla")


def test_an_empty_prompt_starts_from_bos(checkpoint):
    proc = run_cli("generate", checkpoint, "--prompt", "", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] == 1  # just <bos>


def test_model_path_and_prompt_come_from_the_environment(checkpoint):
    env = clean_env(MODEL_PATH=str(checkpoint), PROMPT="the quick")
    proc = run_cli(
        "generate", "-n", "2", "--max-new-tokens", "12", "--seed", "3", "--ignore-eos", "--json",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt"] == "the quick" and out["prompt_tokens"] == 9
    assert len(out["samples"]) == 2 and out["completion_tokens"] == 24
    assert out["tokens_per_s"] > 0 and out["seconds"] > 0
    lm = semilla.load(str(checkpoint), device="cpu")
    expected = lm.generate("the quick", num_samples=2, max_new_tokens=12, seed=3, ignore_eos=True)
    assert [s["text"] for s in out["samples"]] == expected
    assert all(s["finish_reason"] == "length" for s in out["samples"])


def test_dtype_bfloat16_generates_what_the_api_does_in_bfloat16(checkpoint):
    proc = run_cli(
        "generate", checkpoint, "--prompt", "the", "--dtype", "bfloat16", "--max-new-tokens", "15",
        "--seed", "2", "--ignore-eos", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lm = semilla.load(str(checkpoint), device="cpu", dtype="bfloat16")
    expected = lm.generate("the", max_new_tokens=15, seed=2, ignore_eos=True)
    assert json.loads(proc.stdout)["samples"][0]["text"] == expected


def test_stream_prints_the_prompt_and_its_continuation(checkpoint):
    proc = run_cli(
        "generate", checkpoint, "--prompt", "the", "--stream", "--max-new-tokens", "20",
        "--seed", "1", "--stop-string", "zz",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lm = semilla.load(str(checkpoint), device="cpu")
    expected = "the" + lm.generate("the", max_new_tokens=20, seed=1, stop="zz")
    assert proc.stdout == expected + "\n"
