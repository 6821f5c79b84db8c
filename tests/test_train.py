"""Training: exact resume (also after Ctrl-C), run-directory outputs, schedules, early stopping."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_TRAIN, clean_env, run_cli, tiny_configs, tiny_train_flags

from semilla.checkpoint import load_checkpoint
from semilla.config import TrainConfig
from semilla.errors import CheckpointError
from semilla.train import lr_at, train
from semilla.train_setup import resume_configs

COMPARED = ("loss", "acc", "top5_acc", "grad_norm", "lr")


def metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if r["kind"] == kind}
    assert len(by_step) == len([r for r in rows if r["kind"] == kind]), "a step was logged twice"
    return by_step


def assert_same_training(a: Path, b: Path, steps: int) -> None:
    """Identical per-step metrics and bit-identical final weights and optimizer moments."""
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, steps + 1))
    for step in ma:
        assert {k: ma[step][k] for k in COMPARED} == {k: mb[step][k] for k in COMPARED}, step
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (a / "last" / name).read_bytes() == (b / "last" / name).read_bytes(), name


RESUME_CASES = {
    # constant LR: the schedule does not depend on max_iters, so N then 2N == 2N straight
    "llama": dict(lr_schedule="constant"),  # Muon on the blocks' matrices, AdamW on the rest
    "llama-adamw": dict(lr_schedule="constant", optimizer="adamw"),
    # dropout draws from the torch RNG: only an exact RNG restore keeps the losses equal;
    # the plateau schedule's running factor is part of the restored state
    "dropout-plateau": dict(dropout=0.2, lr_schedule="plateau", eval_interval=2, plateau_patience=0),
    "lstm-dropout": dict(arch="lstm", n_embd=32, lstm_hidden=48, dropout=0.3, lr_schedule="constant"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_training_straight_through(tmp_path: Path, prepared_dir: Path, case: str) -> None:
    n = 4
    settings = dict(deterministic=True, seed=7, **RESUME_CASES[case])
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(*tiny_configs(prepared_dir, straight, max_iters=2 * n, **settings))
    first = train(*tiny_configs(prepared_dir, halves, max_iters=n, **settings))
    assert first["step"] == n
    model_cfg, train_cfg = resume_configs(str(halves), {"max_iters": 2 * n})
    assert train_cfg.max_iters == 2 * n and train_cfg.seed == 7 and train_cfg.deterministic
    second = train(model_cfg, train_cfg, resume=str(halves))
    assert second["step"] == 2 * n
    assert_same_training(straight, halves, 2 * n)


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path: Path, prepared_dir: Path) -> None:
    """SIGINT mid-run: exit 130 with last/ saved; --resume finishes it as if never stopped."""
    total = 80
    settings = dict(max_iters=total, eval_interval=10, save_interval=1000, sample_interval=1000)
    run = tmp_path / "interrupted"
    cmd = [
        sys.executable,
        "-m",
        "semilla",
        "train",
        "--data",
        str(prepared_dir),
        "--out-dir",
        str(run),
    ]
    cmd += tiny_train_flags(deterministic=True, **settings)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env())
    try:
        for line in proc.stderr:
            if line.startswith("step 3 train"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    stopped_at = state["step"]
    assert 3 <= stopped_at < total
    assert "interrupted=True" in out

    resumed = run_cli("train", "--resume", run, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == total

    straight = tmp_path / "straight"
    train(*tiny_configs(prepared_dir, straight, deterministic=True, **settings))
    assert_same_training(straight, run, total)


def test_run_directory_outputs(tiny_run: Path) -> None:
    for name in ("last", "best"):
        load_checkpoint(tiny_run / name)
    assert (tiny_run / "last" / "trainer_state.json").is_file()
    assert (tiny_run / "last" / "optimizer.safetensors").is_file()
    assert not (tiny_run / "best" / "optimizer.safetensors").exists()  # best/ is for use, not resume

    train_rows = metrics(tiny_run, "train")
    assert sorted(train_rows) == list(range(1, TINY_TRAIN["max_iters"] + 1))
    for row in train_rows.values():
        for key in (
            "loss",
            "ppl",
            "acc",
            "top5_acc",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "memory_mb",
        ):
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), key
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-4)
        assert 0 <= row["acc"] <= row["top5_acc"] <= 1
        assert row["tokens_per_s"] > 0 and row["memory_mb"] > 0
    val_rows = metrics(tiny_run, "val")
    assert sorted(val_rows) == [4, 8]
    state = json.loads((tiny_run / "last" / "trainer_state.json").read_text())
    assert state["best_val_loss"] == pytest.approx(min(r["loss"] for r in val_rows.values()), abs=1e-5)
    assert state["tokens_seen"] == 8 * TINY_TRAIN["batch_size"] * TINY_TRAIN["block_size"]

    events = list((tiny_run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"train/loss", b"train/lr", b"val/loss", b"sample"):
        assert tag in data, tag


def test_training_lowers_the_loss(tmp_path: Path, prepared_dir: Path) -> None:
    result = train(
        *tiny_configs(prepared_dir, tmp_path / "run", max_iters=30, learning_rate=1e-2, eval_interval=30)
    )
    rows = metrics(tmp_path / "run")
    assert rows[30]["loss"] < rows[1]["loss"] - 0.5
    vocab = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["model"]["vocab_size"]
    assert result["val_loss"] < math.log(vocab)  # better than a uniform guess


def test_bfloat16_autocast_on_cpu_trains_and_evaluates(tmp_path: Path, prepared_dir: Path) -> None:
    """`--dtype bfloat16` on a CPU: training steps and the no-grad evaluations in autocast."""
    result = train(
        *tiny_configs(prepared_dir, tmp_path / "run", max_iters=20, learning_rate=1e-2, dtype="bfloat16")
    )
    rows = metrics(tmp_path / "run")
    assert rows[20]["loss"] < rows[1]["loss"] - 0.3
    assert math.isfinite(result["val_loss"])


def test_grad_accumulation_counts_tokens(tmp_path: Path, prepared_dir: Path) -> None:
    train(*tiny_configs(prepared_dir, tmp_path / "run", max_iters=2, grad_accum=3, label_smoothing=0.1))
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert state["tokens_seen"] == 2 * 3 * TINY_TRAIN["batch_size"] * TINY_TRAIN["block_size"]


def test_early_stopping_when_validation_stops_improving(tmp_path: Path, prepared_dir: Path) -> None:
    """An absurd learning rate: validation gets worse, training stops long before max_iters."""
    run = tmp_path / "run"
    settings = dict(learning_rate=30.0, min_lr=0.0, warmup_iters=0, eval_interval=1)
    result = train(*tiny_configs(prepared_dir, run, max_iters=50, early_stopping_patience=3, **settings))
    assert result["step"] < 50
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["stopped_early"] and state["evals_since_best"] == 3
    assert state["step"] == result["step"]


def test_plateau_schedule_halves_the_lr_after_bad_evaluations(tmp_path: Path, prepared_dir: Path) -> None:
    run = tmp_path / "run"
    settings = dict(learning_rate=30.0, min_lr=0.0, warmup_iters=0, eval_interval=1)
    train(
        *tiny_configs(prepared_dir, run, max_iters=6, lr_schedule="plateau", plateau_patience=0, **settings)
    )
    lrs = [row["lr"] for _, row in sorted(metrics(run).items())]
    assert lrs[0] == 30.0
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))  # only ever reduced
    assert lrs[-1] < 30.0
    scale = json.loads((run / "last" / "trainer_state.json").read_text())["lr_scale"]
    assert math.log2(1 / scale) == int(math.log2(1 / scale)) >= 1  # halved a whole number of times


def test_lr_warmup_then_cosine_to_min_lr() -> None:
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    warmup = [lr_at(s, cfg, 1.0) for s in range(10)]
    assert all(b > a for a, b in zip(warmup, warmup[1:], strict=False))
    assert warmup[-1] < cfg.learning_rate
    assert lr_at(10, cfg, 1.0) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 1.0) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the cosine
    decay = [lr_at(s, cfg, 1.0) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(110, cfg, 1.0) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 1.0) == pytest.approx(1e-4)  # never below min_lr


def test_plateau_and_constant_schedules() -> None:
    plateau = TrainConfig(learning_rate=1e-3, warmup_iters=0, lr_schedule="plateau", plateau_min_lr=1e-6)
    assert lr_at(5, plateau, 1.0) == 1e-3
    assert lr_at(5, plateau, 0.5) == 5e-4
    assert lr_at(5, plateau, 0.5**20) == 1e-6  # floored at plateau_min_lr
    constant = TrainConfig(learning_rate=1e-3, warmup_iters=0, lr_schedule="constant")
    assert lr_at(0, constant, 1.0) == lr_at(10_000, constant, 1.0) == 1e-3


def test_resume_refuses_a_changed_model_shape(tiny_run: Path) -> None:
    with pytest.raises(CheckpointError, match="n_layer 2 -> 3"):
        resume_configs(str(tiny_run), {"n_layer": 3})
    model_cfg, _ = resume_configs(str(tiny_run), {"n_layer": 2, "max_iters": 9})  # unchanged is fine
    assert model_cfg.n_layer == 2


def test_resume_needs_a_resumable_checkpoint(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(CheckpointError, match="no resumable checkpoint"):
        resume_configs(str(tmp_path), {})
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "last" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        resume_configs(str(run), {})


def test_resume_after_a_crash_mid_swap(tmp_path: Path, tiny_run: Path) -> None:
    """A kill between `last` -> `.last.old` and the new `last` landing: resume still works."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "last").rename(run / ".last.old")
    model_cfg, train_cfg = resume_configs(str(run), {"max_iters": 10})
    result = train(model_cfg, train_cfg, resume=str(run))
    assert result["step"] == 10
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 10
    assert not (run / ".last.old").exists()


def test_compile_left_unset_is_on_only_where_it_pays_back(monkeypatch) -> None:
    """Unset, --compile is off where semilla's CPU kernels run (eager is as fast with them); without
    them it is on for a long run of one CPU process with a C++ compiler, and off for short runs,
    LoRA, ages, deterministic runs, several processes, an LSTM; given, it rules."""
    from types import SimpleNamespace

    import torch

    from semilla.config import ModelConfig
    from semilla.distributed import World
    from semilla.models import kernels
    from semilla.train_setup import COMPILE_PAYS_BACK_STEPS, compiles

    def trainer(arch: str = "transformer", stages=(), processes: int = 1, **config) -> SimpleNamespace:
        return SimpleNamespace(config=TrainConfig(**config), model_config=ModelConfig(arch=arch),
                               device=torch.device("cpu"), stages=list(stages), world=World(size=processes))  # fmt: skip

    long = COMPILE_PAYS_BACK_STEPS
    assert kernels.compiled() is not None and not compiles(trainer(max_iters=10 * long))
    monkeypatch.setattr(kernels, "compiled", lambda: None)  # SEMILLA_KERNELS=0, or no build
    assert compiles(trainer(max_iters=long)) and not compiles(trainer())  # the default recipe's 1,600
    assert not compiles(trainer(max_iters=long - 1))
    assert not compiles(trainer(max_iters=long, lora_r=8))
    assert not compiles(trainer(max_iters=long, deterministic=True))
    assert not compiles(trainer(max_iters=long, stages=["age_0"]))
    assert not compiles(trainer(max_iters=long, processes=2))
    assert not compiles(trainer(arch="lstm", max_iters=long))
    assert compiles(trainer(max_iters=8, compile=True))
    assert not compiles(trainer(max_iters=10 * long, compile=False))
    monkeypatch.setenv("CXX", "no-such-compiler-here")  # inductor could not build its kernels
    assert not compiles(trainer(max_iters=long))


def test_compile_flags_say_on_off_or_leave_it_to_semilla() -> None:
    from semilla.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--compile"]).compile is True
    assert parse(["train", "--no-compile"]).compile is False
    assert parse(["train"]).compile is None


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one(tmp_path: Path, prepared_dir: Path, caplog) -> None:
    """--compile: the same run (seed, batches) reaches the eager run's losses, the log says how
    long the compilation took, and the checkpoint holds the model's own weight names."""
    import logging

    flags = dict(max_iters=6, dtype="float32", eval_interval=6, save_interval=6, sample_interval=6)
    train(*tiny_configs(prepared_dir, tmp_path / "eager", compile=False, **flags))
    with caplog.at_level(logging.INFO, logger="semilla"):
        train(*tiny_configs(prepared_dir, tmp_path / "compiled", compile=True, **flags))
    assert any(r.getMessage().startswith("compiled the model in ") for r in caplog.records)
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for step in (1, 6):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], abs=1e-3)
    val = [metrics(tmp_path / run, "val")[6]["loss"] for run in ("eager", "compiled")]
    assert val[1] == pytest.approx(val[0], abs=1e-3)
    model = load_checkpoint(tmp_path / "compiled" / "last")[0]
    assert not any("_orig_mod" in name for name in model.state_dict())
