"""Distributed training on CPU (gloo): two processes train like one with the same global batch,
resume exactly (on as many processes or fewer), start --init-from a checkpoint, refuse a batch
they cannot share, and stop cleanly when one of them is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_one_line_error, clean_env, run_cli, tiny_configs, tiny_train_flags
from safetensors.torch import load_file

from semilla.checkpoint import load_checkpoint
from semilla.distributed import World, micro_steps, world_from_env
from semilla.models import kernels
from semilla.train import train
from semilla.train_inputs import init_model_config
from semilla.train_setup import resume_configs

# 20 steps of a global batch of 2 micro-batches; a constant LR so a run resumed with a longer
# max_iters follows the same schedule as one trained straight through; float32, as bfloat16
# autocast rounds sharded (FSDP) matmuls differently from whole ones
DDP_TRAIN = dict(
    max_iters=20, grad_accum=2, deterministic=True, seed=3, lr_schedule="constant",
    eval_interval=10, save_interval=10, sample_interval=10, dtype="float32",
)  # fmt: skip
TOLERANCE = 1e-5


def env() -> dict[str, str]:
    """The processes' environment: PyTorch's operators for evaluation and samples, so no rank
    waits on the CPU kernels' build lock (held by any other semilla process on the machine)."""
    return clean_env(SEMILLA_KERNELS="0")


@pytest.fixture(scope="module", autouse=True)
def operators_in_process():
    """The runs trained in this process use PyTorch's operators too, as the ranks do (env()):
    the elementwise kernels round a little differently, and 20 steps grow that past TOLERANCE."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "elementwise", lambda *tensors: None)
        yield


def train_processes(
    data: Path, out: Path, nproc: int, *extra: str, **settings
) -> subprocess.CompletedProcess:
    """`semilla train --nproc N` with the tiny settings; it must succeed."""
    flags = tiny_train_flags(**{**DDP_TRAIN, **settings})
    proc = run_cli(
        "train", "--data", data, "--out-dir", out, "--nproc", nproc, *flags, *extra, timeout=300, env=env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= TOLERANCE, worst


def train_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "one"
    train(*tiny_configs(prepared_dir, run, **DDP_TRAIN))
    return run


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("ddp") / "two"
    proc = train_processes(prepared_dir, run, 2)
    return run, proc.stdout


def test_world_and_micro_batch_shares() -> None:
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == World(1, 1, 2)
    assert list(micro_steps(World(0, 0, 2), 6)) == [0, 2, 4]
    assert list(micro_steps(World(1, 1, 2), 6)) == [1, 3, 5]


@pytest.mark.slow
def test_two_processes_train_like_one(one_process: Path, two_processes: tuple[Path, str]) -> None:
    """The same global batch (2 micro-batches: one per rank vs both in one process), 20 steps:
    the same weights within 1e-5; rank 0 alone wrote the run and printed its summary."""
    run, stdout = two_processes
    assert_same_weights(one_process, run)
    assert train_steps(run) == list(range(1, 21))  # each step logged once: one writer
    assert stdout.count("done:") == 1
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # one TensorBoard event file
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (
        state["tokens_seen"]
        == json.loads((one_process / "last" / "trainer_state.json").read_text())["tokens_seen"]
    )
    assert {"torch", "torch_1", "data", "data_1"} <= state["rng"].keys()  # every rank's RNG


@pytest.mark.slow
def test_resume_of_a_two_process_run_equals_a_straight_one(
    tmp_path: Path, prepared_dir: Path, two_processes: tuple[Path, str]
) -> None:
    """10 steps on two processes, then --resume to 20 on two, and on one: both equal the
    straight 20 steps on two (the batches belong to micro-batch streams, not to ranks)."""
    straight, _ = two_processes
    half = tmp_path / "half"
    train_processes(prepared_dir, half, 2, max_iters=10)
    again = tmp_path / "again"
    subprocess.run(["cp", "-r", str(half), str(again)], check=True)
    proc = run_cli("train", "--resume", half, "--nproc", 2, "--max-iters", 20, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(straight, half)
    assert train_steps(half) == list(range(1, 21))
    model_cfg, train_cfg = resume_configs(str(again), {"max_iters": 20})
    train(model_cfg, train_cfg, resume=str(again))  # the same run resumed as one process
    assert_same_weights(straight, again)


@pytest.mark.slow
def test_init_from_on_two_processes_equals_one(tmp_path: Path, prepared_dir: Path, tiny_run: Path) -> None:
    settings = dict(max_iters=6, eval_interval=6, save_interval=6, sample_interval=6)
    one = tmp_path / "one"
    _, train_cfg = tiny_configs(prepared_dir, one, init_from=str(tiny_run), **{**DDP_TRAIN, **settings})
    train(init_model_config(str(tiny_run), {}), train_cfg)  # the checkpoint's shape, as `semilla train` does
    two = tmp_path / "two"
    flags = [f for f in tiny_train_flags(**{**DDP_TRAIN, **settings}) if f not in ("--preset", "tiny")]
    proc = run_cli(
        "train", "--data", prepared_dir, "--out-dir", two, "--init-from", tiny_run, "--nproc", 2, *flags,
        timeout=300, env=env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(one, two)
    assert json.loads((two / "last" / "config.json").read_text())["train"]["init_from"] == str(
        tiny_run / "best"
    )


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path: Path, prepared_dir: Path) -> None:
    proc = run_cli(
        "train", "--data", prepared_dir, "--out-dir", tmp_path / "run", "--nproc", 2,
        *tiny_train_flags(grad_accum=3),
    )  # fmt: skip
    assert_one_line_error(proc, "--grad-accum 3", "2 processes", "multiple of 2")
    assert not (tmp_path / "run").exists()


def test_torchrun_with_more_ranks_than_micro_batches_is_refused(tmp_path: Path, prepared_dir: Path) -> None:
    """Straight torchrun, 3 ranks for 2 micro-batches: every rank exits 2 naming the flag."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    cmd += ["-m", "semilla", "train", "--data", str(prepared_dir), "--out-dir", str(tmp_path / "run")]
    proc = subprocess.run(
        cmd + tiny_train_flags(grad_accum=2), capture_output=True, text=True, timeout=300, env=env()
    )
    assert proc.returncode != 0
    assert "semilla: error: --grad-accum 2 cannot be shared by 3 processes" in proc.stderr
    assert not (tmp_path / "run").exists()


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the process of `rank` that `launcher` started (from /proc: parent and RANK)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_resume_continues(tmp_path: Path, prepared_dir: Path) -> None:
    """kill -9 of rank 1 mid-run: rank 0 stops too (no hang), last/ is intact, and --resume
    finishes the run on two processes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "semilla", "train", "--data", str(prepared_dir), "--out-dir", str(run)]
    cmd += ["--nproc", "2", *tiny_train_flags(**{**DDP_TRAIN, "max_iters": 100_000, "save_interval": 5})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        for line in proc.stderr:
            if line.startswith("step 12 train"):
                break
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert time.monotonic() - start < 60
    assert "Traceback" not in err, err[-3000:]
    assert "semilla: error: process 1 of 2 was killed (SIGKILL)" in err
    saved = json.loads((run / "last" / "trainer_state.json").read_text())["step"]
    assert saved >= 10 and saved % 5 == 0
    proc = run_cli("train", "--resume", run, "--nproc", 2, "--max-iters", saved + 10, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == saved + 10
    steps = train_steps(run)
    assert steps == list(range(1, saved + 11))  # each step once: the killed run's tail was dropped
    assert all(torch.isfinite(w).all() for w in load_file(run / "last" / "model.safetensors").values())


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_like_one_and_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    """FSDP2 (weights, gradients and AdamW state sharded over 2 processes; the default
    optimizer is AdamW there, as Muon needs whole matrices): 10 steps, --resume to 20, equal to
    one process with AdamW within 1e-5; the checkpoint is the usual single directory."""
    one_process = tmp_path / "one"
    train(*tiny_configs(prepared_dir, one_process, **DDP_TRAIN, optimizer="adamw"))
    run = tmp_path / "fsdp"
    train_processes(prepared_dir, run, 2, "--fsdp", max_iters=10)
    proc = run_cli("train", "--resume", run, "--nproc", 2, "--max-iters", 20, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(one_process, run)
    model, _, _ = load_checkpoint(run / "last")  # what every other command reads
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((run / "last" / "config.json").read_text())["train"]["fsdp"] is True


def test_fsdp_needs_several_processes(tmp_path: Path, prepared_dir: Path) -> None:
    proc = run_cli(
        "train", "--data", prepared_dir, "--out-dir", tmp_path / "run", "--fsdp", *tiny_train_flags()
    )
    assert_one_line_error(proc, "--fsdp", "--nproc")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ages_grow_alike_on_two_processes(tmp_path: Path, prepared_dir: Path) -> None:
    """A run through two ages (growth in the middle, the model re-wrapped in DDP) on two
    processes equals the same run on one."""
    schedule = tmp_path / "stages.yaml"
    schedule.write_text(
        yaml.safe_dump({"stages": [
            {"name": "seedling", "steps": 4, "n_embd": 16, "n_layer": 1, "n_head": 2},
            {"name": "sapling", "steps": 4, "n_embd": 32, "n_layer": 2, "n_head": 4},
        ]})
    )  # fmt: skip
    settings = dict(age_schedule=str(schedule), eval_interval=4, save_interval=4, sample_interval=100)
    one = tmp_path / "one"
    train(*tiny_configs(prepared_dir, one, **{**DDP_TRAIN, **settings, "max_iters": 8}))
    two = tmp_path / "two"
    train_processes(prepared_dir, two, 2, **settings, max_iters=8)
    assert_same_weights(one, two)
    assert (two / "ages" / "sapling_final").is_dir()
