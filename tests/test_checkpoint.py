"""Checkpoints: exact round trips, clear errors for broken directories, and crash safety
(kill -9 mid-write, disk full mid-write: the previous checkpoint always survives)."""

from __future__ import annotations

import errno
import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import clean_env, limit_file_size

from semilla.checkpoint import load_checkpoint, save_checkpoint
from semilla.config import preset, replace
from semilla.errors import CheckpointError
from semilla.models import build_model
from semilla.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(corpus_text: str) -> Tokenizer:
    return Tokenizer.train_char([corpus_text])


def model_for(tokenizer: Tokenizer, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = replace(preset("tiny"), vocab_size=tokenizer.vocab_size, block_size=32, **changes)
    return build_model(cfg).eval()


MODELS = {
    "llama": {},
    "gpt2-tied": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "sinusoidal-gqa": dict(pos="sinusoidal", n_head=4, n_kv_head=2),
    "lstm": dict(arch="lstm", n_embd=16, lstm_hidden=24),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, tokenizer: Tokenizer, name: str) -> None:
    model = model_for(tokenizer, **MODELS[name])
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    loaded, loaded_tok, config = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    idx = torch.randint(0, tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded_tok.encode("En un lugar") == tokenizer.encode("En un lugar")
    assert config["model"]["vocab_size"] == tokenizer.vocab_size
    assert config["format_version"] == 1 and config["semilla_version"]


def test_tied_head_is_stored_once(tmp_path: Path, tokenizer: Tokenizer) -> None:
    from safetensors import safe_open

    model = model_for(tokenizer, tie_embeddings=True)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_shapes_come_from_the_weights_not_config_json(tmp_path: Path, tokenizer: Tokenizer) -> None:
    model = model_for(tokenizer, **MODELS["gpt2-tied"])
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"].update(n_layer=7, block_size=999, vocab_size=3)  # lies, all of them
    config_path.write_text(json.dumps(config))
    loaded, _, info = load_checkpoint(tmp_path / "ckpt")
    assert (info["model"]["n_layer"], info["model"]["block_size"]) == (2, 32)
    assert info["model"]["vocab_size"] == tokenizer.vocab_size
    idx = torch.randint(0, tokenizer.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_run_directory_resolves_to_best_or_last(tiny_run: Path) -> None:
    _, _, best = load_checkpoint(tiny_run)
    _, _, last = load_checkpoint(tiny_run, prefer="last")
    assert Path(best["path"]) == tiny_run / "best"
    assert Path(last["path"]) == tiny_run / "last"


# --- broken directories -----------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_run: Path) -> Path:
    """A writable copy of the tiny run's last/ checkpoint."""
    return Path(shutil.copytree(tiny_run / "last", tmp_path / "ckpt"))


def test_checkpoint_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(checkpoint: Path, missing: str) -> None:
    (checkpoint / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_checkpoint(checkpoint)


def test_truncated_weights(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(checkpoint)


def test_weights_that_do_not_match_the_config(tmp_path: Path, checkpoint: Path, tokenizer) -> None:
    other = model_for(tokenizer, n_head=4, mlp="gelu")  # same embedding, other layers
    save_checkpoint(tmp_path / "other", other, tokenizer)
    shutil.copy(tmp_path / "other" / "model.safetensors", checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(checkpoint)


def test_newer_format_version_asks_to_upgrade(checkpoint: Path) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config.update(format_version=99, semilla_version="9.0.0")
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="upgrade") as err:
        load_checkpoint(checkpoint)
    assert "9.0.0" in str(err.value) and "format 99" in str(err.value)


def test_config_json_is_not_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(checkpoint)


# --- crash safety -----------------------------------------------------------------------

SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from semilla.checkpoint import save_checkpoint
    from semilla.config import preset, replace
    from semilla.models import build_model
    from semilla.tokenizer import Tokenizer

    run, first = Path(sys.argv[1]), int(sys.argv[2])
    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz .,"])
    cfg = replace(preset("tiny"), vocab_size=tok.vocab_size, n_embd=96, n_head=4, n_layer=4)
    model = build_model(cfg)
    step = first
    while True:
        with torch.no_grad():  # weights that say which save they belong to
            model.model.norm.weight.fill_(float(step))
        save_checkpoint(run / "last", model, tok, trainer_state={"step": step})
        print(step, flush=True)
        step += 1
    """
)


def check_consistent(run: Path) -> int:
    """Load the run's last checkpoint; its weights and trainer_state must be from one save."""
    model, _, config = load_checkpoint(run, prefer="last")
    step = json.loads((Path(config["path"]) / "trainer_state.json").read_text())["step"]
    assert torch.all(model.model.norm.weight == float(step))
    # the checkpoint directory itself also resolves, even right after a crash mid-swap
    load_checkpoint(run / "last")
    return step


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1234)
    run = tmp_path / "run"
    newest = -1
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(run), str(newest + 1)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=clean_env(),
        )
        try:
            seen = [int(proc.stdout.readline())]  # one save completed
            started = time.perf_counter()
            seen.append(int(proc.stdout.readline()))
            per_save = time.perf_counter() - started
            time.sleep(rng.uniform(0, 3 * per_save))  # land anywhere inside the next saves
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        step = check_consistent(run)
        assert step >= seen[-1]  # a completed save is never lost
        newest = step
    assert newest >= 9


def test_crash_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path: Path, tiny_run: Path) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "last").rename(run / ".last.old")  # dest moved aside, new one not yet in place
    _, _, config = load_checkpoint(run, prefer="last")
    assert Path(config["path"]) == run / ".last.old"
    load_checkpoint(run / "last")  # naming the checkpoint itself works too
    model, tok, _ = load_checkpoint(run / "best")
    save_checkpoint(run / "last", model, tok)  # the next save restores, then replaces
    assert (run / "last" / "config.json").is_file() and not (run / ".last.old").exists()


DISK_FULL = textwrap.dedent(
    """
    import json, sys
    import torch
    from semilla.checkpoint import load_checkpoint, save_checkpoint

    model, tok, _ = load_checkpoint(sys.argv[1])
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    try:
        save_checkpoint(sys.argv[1], model, tok)
    except OSError as e:
        print(json.dumps({"errno": e.errno, "filename": e.filename, "message": str(e)}))
    """
)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(checkpoint: Path) -> None:
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    assert len(before["model.safetensors"]) > 64 * 1024  # the new weights cannot fit
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(checkpoint)],
        capture_output=True,
        text=True,
        env=clean_env(),
        preexec_fn=limit_file_size(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout)
    assert error["errno"] == errno.EFBIG
    assert error["filename"] == str(checkpoint)
    assert "cannot save checkpoint" in error["message"]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.*"))  # no temp dir left over
    load_checkpoint(checkpoint)
