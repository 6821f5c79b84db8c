"""Helpers shared by the tests: tiny settings and a way to run the CLI as a user does."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from semilla.config import DATASHARK_ALIASES, ENV_PREFIX, resolve_configs

DEMO_TEXT = Path(__file__).resolve().parents[1] / "src" / "semilla" / "demo" / "quijote.txt"

# Fast settings for every test run: tiny llama, short context, a handful of steps.
TINY_TRAIN = dict(
    block_size=32,
    batch_size=4,
    max_iters=8,
    warmup_iters=2,
    # the optimizer the tests' quality bounds were measured with (semilla train's defaults now
    # suit its default shape: 3e-3 -> 3e-4, weight decay 0.1)
    learning_rate=1e-3,
    min_lr=1e-4,
    weight_decay=0.01,
    eval_interval=4,
    eval_iters=2,
    log_interval=1,
    save_interval=4,
    sample_interval=4,
    sample_tokens=8,
    device="cpu",
    progress=False,
)


def tiny_configs(data: Path | str, out_dir: Path | str, **overrides: Any):
    """(ModelConfig, TrainConfig) of the tiny preset with TINY_TRAIN and `overrides`."""
    values = {**TINY_TRAIN, "data": str(data), "out_dir": str(out_dir), **overrides}
    return resolve_configs("tiny", overrides=values, environ={})


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without SEMILLA_* or DataShark variables that would leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k not in DATASHARK_ALIASES}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """`semilla ARGS...` in a subprocess, as a user runs it."""
    kwargs.setdefault("env", clean_env())
    return subprocess.run(
        [sys.executable, "-m", "semilla", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def tiny_train_flags(**overrides: Any) -> list[str]:
    """TINY_TRAIN (plus overrides) as `semilla train` flags."""
    flags: list[str] = ["--preset", "tiny"]
    for key, value in {**TINY_TRAIN, **overrides}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and a stderr that is exactly one `semilla: error:` line naming `needles`."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("semilla: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def limit_file_size(limit: int = 64 * 1024):
    """A preexec_fn: files may not grow past `limit` bytes, and writing past it is EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply
