"""The CLI as a user meets it: each bad input is one `semilla: error:` line and exit code 2,
never a traceback, and nothing is left half-written.

The checks that only read an error run cli.main in the test process (cli_in_process: run_cli's
environment, Python's warnings on stderr), sparing a torch import each; what needs a process of
its own (a file-size limit, another working directory) and a sample of what prepare and info
print run as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    limit_file_size,
    run_cli,
    tiny_configs,
    tiny_train_flags,
)

from semilla.checkpoint import load_checkpoint
from semilla.train import train


@pytest.fixture
def run_copy(tmp_path: Path, tiny_run: Path) -> Path:
    """A writable copy of the session's tiny run (last/ at step 8, best/, metrics)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def error_is_last_line(proc, *needles: str) -> str:
    """For `train`, which logs progress first: exit 2, one error line at the end, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("semilla: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


# --- prepare ------------------------------------------------------------------------------


def test_prepare_prints_statistics(tmp_path: Path, corpus_file: Path) -> None:
    proc = run_cli("prepare", corpus_file, "-o", tmp_path / "out", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["documents"] == 1 and stats["tokens"] > 0
    assert all(stats["splits"][s]["tokens"] > 0 for s in ("train", "val", "test"))
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == stats


@pytest.mark.parametrize("kind", ["empty-file", "folder-of-empty-files"])
def test_empty_corpus(tmp_path: Path, kind: str, cli_in_process) -> None:
    if kind == "empty-file":
        target = tmp_path / "empty.txt"
        target.write_text("")
    else:
        target = tmp_path / "docs"
        target.mkdir()
        (target / "a.txt").write_text("")
        (target / "b.md").write_text("")
    proc = cli_in_process("prepare", target, "-o", tmp_path / "out")
    assert_one_line_error(proc, "empty", str(target))
    assert not (tmp_path / "out").exists()


def test_empty_corpus_through_train(tmp_path: Path, cli_in_process) -> None:
    (tmp_path / "empty.txt").write_text("")
    proc = cli_in_process(
        "train", "--data", tmp_path / "empty.txt", "--out-dir", tmp_path / "run", "--no-progress"
    )
    error_is_last_line(proc, "empty")
    assert not (tmp_path / "run" / "data").exists()


def test_path_that_does_not_exist(tmp_path: Path, cli_in_process) -> None:
    missing = tmp_path / "nope.txt"
    assert_one_line_error(
        cli_in_process("prepare", missing, "-o", tmp_path / "out"), "not found", str(missing)
    )
    assert not (tmp_path / "out").exists()


def test_binary_file_in_text_folder_is_skipped_with_a_warning(tmp_path: Path, corpus_text: str) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "cervantes.txt").write_text(corpus_text[:3000], encoding="utf-8")
    (folder / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    proc = run_cli("prepare", folder, "-o", tmp_path / "out", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "photo.txt" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [Path(p).name for p in json.loads(proc.stdout)["inputs"]] == ["cervantes.txt"]


# --- train: configuration and data ------------------------------------------------------


def test_n_embd_not_divisible_by_n_head(tmp_path: Path, prepared_dir: Path, cli_in_process) -> None:
    proc = cli_in_process(
        "train",
        "--data",
        prepared_dir,
        "--out-dir",
        tmp_path / "run",
        *tiny_train_flags(),
        "--n-embd",
        "33",
    )
    assert_one_line_error(proc, "n_embd (33) must be divisible by n_head (2)")
    assert not (tmp_path / "run").exists()


def test_every_config_problem_in_one_line(tmp_path: Path, prepared_dir: Path, cli_in_process) -> None:
    flags = ["--n-embd", "33", "--dropout", "2", "--lr-schedule", "linear"]
    proc = cli_in_process("train", "--data", prepared_dir, "--out-dir", tmp_path / "run", *flags)
    assert_one_line_error(proc, "n_embd (33)", "dropout", "lr_schedule")


def test_block_size_larger_than_the_data(tmp_path: Path, prepared_dir: Path, cli_in_process) -> None:
    flags = tiny_train_flags(block_size=4096)
    proc = cli_in_process("train", "--data", prepared_dir, "--out-dir", tmp_path / "run", *flags)
    assert_one_line_error(proc, "block_size 4096 is larger than the data", "--block-size")
    assert not (tmp_path / "run").exists()


def test_unknown_preset(
    tmp_path: Path, prepared_dir: Path, cli_in_process, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = cli_in_process("train", "--preset", "gpt-17", "--data", prepared_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice: 'gpt-17'" in proc.stderr  # argparse's usage error, also exit 2
    assert_one_line_error(cli_in_process("info", "gpt-17"), "'gpt-17' is neither a preset", "datashark-10m")
    monkeypatch.setenv("SEMILLA_PRESET", "gpt-17")
    proc = cli_in_process("train", "--data", prepared_dir, "--out-dir", tmp_path / "run")
    assert_one_line_error(proc, "unknown preset 'gpt-17'")


def test_out_dir_under_a_regular_file(tmp_path: Path, prepared_dir: Path, cli_in_process) -> None:
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "run"
    proc = cli_in_process("train", "--data", prepared_dir, "--out-dir", out, *tiny_train_flags())
    assert_one_line_error(proc, str(out), "Not a directory")


# --- broken checkpoints -------------------------------------------------------------------


def test_info_on_a_checkpoint_missing_a_file(run_copy: Path, cli_in_process) -> None:
    (run_copy / "last" / "tokenizer.json").unlink()
    assert_one_line_error(cli_in_process("info", run_copy / "last"), "missing tokenizer.json")


def test_resume_from_a_checkpoint_missing_a_file(run_copy: Path, cli_in_process) -> None:
    (run_copy / "last" / "model.safetensors").unlink()
    proc = cli_in_process("train", "--resume", run_copy, "--max-iters", "10")
    assert_one_line_error(proc, "missing model.safetensors")


def test_resume_from_a_truncated_model_safetensors(run_copy: Path, cli_in_process) -> None:
    weights = run_copy / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = cli_in_process("train", "--resume", run_copy, "--max-iters", "10")
    assert_one_line_error(proc, "model.safetensors", "truncated or corrupt")
    assert weights.stat().st_size == 1000  # nothing was overwritten


def test_resume_with_a_changed_model_shape(run_copy: Path, cli_in_process) -> None:
    before = (run_copy / "last" / "model.safetensors").read_bytes()
    proc = cli_in_process("train", "--resume", run_copy, "--n-layer", "3")
    assert_one_line_error(proc, "changed model shape", "n_layer 2 -> 3")
    assert (run_copy / "last" / "model.safetensors").read_bytes() == before


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path, cli_in_process) -> None:
    assert_one_line_error(cli_in_process("train", "--resume", tmp_path), "no resumable checkpoint")


def test_resume_works_from_another_working_directory(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with a relative --data path resumes from any directory."""
    shutil.copytree(prepared_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train(*tiny_configs("data", "run", max_iters=4))
    saved = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert saved["train"]["data"] == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("train", "--resume", tmp_path / "run", "--max-iters", "6", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())["step"] == 6


# --- saving fails -------------------------------------------------------------------------


def test_disk_full_while_training_keeps_the_previous_checkpoint(run_copy: Path) -> None:
    """Files may not grow past 64 KB (EFBIG, as on a full disk): saving fails, exit 2, one
    error line, and the step-8 checkpoint is still there and loadable; then resume works."""
    last = run_copy / "last"
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    best_before = {p.name: p.read_bytes() for p in (run_copy / "best").iterdir()}
    proc = run_cli("train", "--resume", run_copy, "--max-iters", "12", preexec_fn=limit_file_size(64 * 1024))
    line = error_is_last_line(proc, "cannot save checkpoint", "File too large")
    assert str(run_copy) in line
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before
    assert {p.name: p.read_bytes() for p in (run_copy / "best").iterdir()} == best_before
    assert not list(run_copy.glob(".*.tmp-*"))  # no half-written temp directories left
    load_checkpoint(last)
    proc = run_cli("train", "--resume", run_copy, "--max-iters", "12")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 12


# --- info ---------------------------------------------------------------------------------


def test_info_datashark_10m() -> None:
    proc = run_cli("info", "datashark-10m")
    assert proc.returncode == 0, proc.stderr
    assert "10,052,480" in proc.stdout
    assert "gpt2 family" in proc.stdout


def test_info_on_a_run_directory(tiny_run: Path, cli_in_process) -> None:
    report = json.loads(cli_in_process("info", tiny_run, "--json").stdout)
    assert report["checkpoint"] == str(tiny_run / "best")
    assert report["layers"] == 2 and report["context"] == 32
