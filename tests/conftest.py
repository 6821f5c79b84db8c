"""Shared fixtures: a small corpus, a prepared dataset, one tiny trained run, and clean global state.

Everything is written under pytest's tmp paths; nothing lands in the repository.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import warnings

# One intra-op thread: on a 2-core machine shared with other work, OpenMP's second thread
# waits whole scheduler slices for each tiny matmul (16 ms instead of 4 us). Set before torch
# loads; subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
# Hypothesis caches (charmaps, constants) outside the repository
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "semilla-hypothesis")
)

from pathlib import Path

import pytest
import torch
from helpers import DEMO_TEXT, TINY_TRAIN, clean_env, tiny_configs
from hypothesis import settings

from semilla.data import prepare

torch.set_num_threads(1)
settings.register_profile("semilla", max_examples=100, deadline=None, database=None)
settings.load_profile("semilla")


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 20 KB of the bundled Quijote: enough for ~80 chars of vocabulary and a few chunks."""
    text = DEMO_TEXT.read_text(encoding="utf-8")[:20_000]
    return text[: text.rindex("\n") + 1]


@pytest.fixture
def corpus_file(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """A char-level prepared dataset of the corpus (read-only: copy it before changing it)."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text(corpus_text, encoding="utf-8")
    prepare([str(root / "corpus.txt")], str(root / "data"))
    return root / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """A run directory trained for 8 steps: last/, best/, metrics.jsonl, tb/ (read-only)."""
    from semilla.train import train

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    result = train(*tiny_configs(prepared_dir, run_dir))
    assert result["step"] == TINY_TRAIN["max_iters"]
    return run_dir


@pytest.fixture
def cli_in_process(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run `semilla ARGS` in this process, as helpers.run_cli does in a subprocess but without
    importing torch again for each call: a CompletedProcess with the exit code and the output.

    The environment is run_cli's (no SEMILLA_* or DataShark variables), and the Python warnings
    the command raises are on its stderr, as a fresh interpreter prints them. `main` installs its
    own log handler on the root logger; the fixture puts logging back."""
    from semilla.cli import main

    for name in os.environ.keys() - clean_env().keys():
        monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        with warnings.catch_warnings(record=True) as caught:
            # what a fresh interpreter would print on stderr (its default filters), each time
            warnings.simplefilter("always")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own errors (exit code 2), as `python -m semilla` exits
                code = e.code
            finally:
                root.handlers[:], root.level = handlers, level
        out = capsys.readouterr()
        printed = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
        return subprocess.CompletedProcess(["semilla", *argv], code, out.out, printed + out.err)

    yield run
    root.handlers[:], root.level = handlers, level


@pytest.fixture(autouse=True)
def _root_logging_kept():
    """cli.main installs its own handler on the root logger, writing to the sys.stderr of the
    moment: under pytest a captured stream, closed after its test. Put the root logger back after
    every test, so no later test logs into a closed file (and prints "--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture(autouse=True)
def _no_global_torch_leaks():
    """Training with deterministic=True flips a process-wide switch; put it back."""
    yield
    torch.use_deterministic_algorithms(False)
