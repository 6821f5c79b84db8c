"""What a user sees of their runs: `semilla list`, `info RUN`, the resume message, samples in
the terminal, and a metrics.jsonl with each (kind, step) once however often a run resumed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import run_cli, tiny_configs

from semilla.runs import find_runs
from semilla.train import train
from semilla.train_setup import resume_configs


@pytest.fixture
def run_copy(tmp_path: Path, tiny_run: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "mine"))


def test_list_shows_runs_and_checkpoints_with_steps_loss_and_size(run_copy: Path) -> None:
    runs = run_copy.parent
    shutil.copytree(run_copy / "best", runs / "exported")
    (runs / "notes").mkdir()
    found = find_runs([str(runs)])
    assert [(Path(f["path"]).name, f["kind"]) for f in found] == [("exported", "checkpoint"), ("mine", "run")]
    state = json.loads((run_copy / "last" / "trainer_state.json").read_text())
    run = found[1]
    assert run["steps"] == 8 and run["best_val_loss"] == pytest.approx(state["best_val_loss"])
    assert run["size_bytes"] > (run_copy / "last" / "model.safetensors").stat().st_size

    proc = run_cli("list", runs)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith(str(run_copy)))
    assert line.split()[1:4] == ["run", "8", f"{state['best_val_loss']:.4f}"]


def test_info_of_a_run_shows_steps_validation_loss_and_size(run_copy: Path) -> None:
    proc = run_cli("info", run_copy, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["steps_trained"] == 8
    assert float(report["best_val_loss"]) > 0
    assert report["size_on_disk"].endswith(("KB", "MB"))


def test_resume_says_where_it_resumed(run_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_cfg, train_cfg = resume_configs(str(run_copy), {"max_iters": 10})
    with caplog.at_level(logging.INFO, logger="semilla"):
        train(model_cfg, train_cfg, resume=str(run_copy))
    assert f"resumed from step 8 of {run_copy}" in caplog.text


def test_metrics_hold_each_kind_and_step_once_after_many_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    """A kill after a checkpoint leaves rows past it (and maybe half a line); the resume
    logs those steps again. They are dropped at the resume, never doubled."""
    run = tmp_path / "run"
    train(*tiny_configs(prepared_dir, run, max_iters=2, save_interval=2, eval_interval=2))
    for n in range(3):
        with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # what a killed run left
            last = 2 * (n + 1)
            f.write(json.dumps({"kind": "train", "step": last + 1, "time": 0, "loss": 9.9}) + "\n")
            f.write('{"kind": "train", "st')
        model_cfg, train_cfg = resume_configs(str(run), {"max_iters": last + 2})
        train(model_cfg, train_cfg, resume=str(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert sorted(s for k, s in keys if k == "train") == list(range(1, 9))
    assert all(r["loss"] != 9.9 for r in rows)


def test_training_prints_its_samples_in_the_terminal(tmp_path: Path, prepared_dir: Path) -> None:
    from helpers import tiny_train_flags

    proc = run_cli("train", "--data", prepared_dir, "--out-dir", tmp_path / "run", *tiny_train_flags())
    assert proc.returncode == 0, proc.stderr
    samples = [line for line in proc.stderr.splitlines() if line.startswith("step 4 sample: ")]
    assert len(samples) == 1 and len(samples[0]) > len("step 4 sample: ")
