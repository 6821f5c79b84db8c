"""Nothing the user made is replaced without asking: a command re-run from shell history is
refused with one line naming --resume / --overwrite, and leaves everything as it was.

The refusals run cli.main in the test process (cli_in_process), sparing a torch import each; the
first prepare, the exports with --overwrite and the train with --overwrite run as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli, tiny_train_flags

from semilla.data import prepare


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) and the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run_copy(tmp_path: Path, tiny_run: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_train_into_a_trained_run_is_refused_and_changes_nothing(
    run_copy: Path, prepared_dir: Path, cli_in_process
) -> None:
    before = tree_digest(run_copy)
    proc = cli_in_process(
        "train", "--data", prepared_dir, "--out-dir", run_copy, *tiny_train_flags(max_iters=2)
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("semilla: error:") and "--resume" in line and "--overwrite" in line, line
    assert "step 8" in line  # says what would have been lost
    assert tree_digest(run_copy) == before


def test_train_overwrite_starts_a_clean_run(run_copy: Path, prepared_dir: Path) -> None:
    proc = run_cli(
        "train", "--data", prepared_dir, "--out-dir", run_copy, "--overwrite", *tiny_train_flags(max_iters=2)
    )
    assert proc.returncode == 0, proc.stderr
    state = json.loads((run_copy / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2  # the old run's rows (to step 8) are gone, not mixed in


def test_prepare_into_a_prepared_dataset_is_refused(
    tmp_path: Path, corpus_file: Path, cli_in_process
) -> None:
    out = tmp_path / "data"
    assert (
        run_cli(
            "prepare", corpus_file, "-o", out, "--tokenizer", "bpe", "--vocab-size", "300", "-q"
        ).returncode
        == 0
    )
    before = tree_digest(out)
    proc = cli_in_process(
        "prepare", corpus_file, "-o", out, "-q"
    )  # char this time: would replace the BPE data
    assert_one_line_error(proc, str(out), "--overwrite")
    assert tree_digest(out) == before
    proc = cli_in_process("prepare", corpus_file, "-o", out, "-q", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "char"


def test_prepare_into_an_empty_folder_needs_no_flag(tmp_path: Path, corpus_file: Path) -> None:
    (tmp_path / "data").mkdir()
    prepare([str(corpus_file)], str(tmp_path / "data"))
    assert (tmp_path / "data" / "meta.json").is_file()


@pytest.mark.parametrize("fmt", ["hf", "int8"])
def test_export_over_an_existing_directory_is_refused(
    tmp_path: Path, tiny_run: Path, fmt: str, cli_in_process
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    proc = cli_in_process("export", fmt, tiny_run, out)
    assert_one_line_error(proc, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run_cli("export", fmt, tiny_run, out, "--overwrite").returncode == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_gguf_export_to_a_directory_says_to_name_a_file(
    tmp_path: Path, tiny_run: Path, cli_in_process
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    proc = cli_in_process("export", "gguf", tiny_run, out)
    line = assert_one_line_error(proc, f"{out} is a directory", "model.gguf")
    assert ".tmp-" not in line
    assert list(out.iterdir()) == []


def test_gguf_export_over_an_existing_file_is_refused(tmp_path: Path, tiny_run: Path, cli_in_process) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the user's older model")
    assert_one_line_error(cli_in_process("export", "gguf", tiny_run, out), "--overwrite")
    assert out.read_bytes() == b"the user's older model"


def test_outputs_follow_the_umask(tmp_path: Path, corpus_file: Path) -> None:
    """Not 0600/0700 from mkstemp/mkdtemp: what a plain open() and mkdir() would give."""
    old = os.umask(0o022)
    try:
        prepare([str(corpus_file)], str(tmp_path / "data"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "data" / "meta.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "data" / "train_000.bin").stat().st_mode) == 0o644
