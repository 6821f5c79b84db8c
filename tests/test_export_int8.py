"""int8 export: perplexity on the tinyshakespeare val split within 2% of fp32, a smaller
weight file, and `semilla generate` loads the int8 checkpoint like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli, tiny_configs

from semilla.checkpoint import load_checkpoint
from semilla.data import prepare
from semilla.export.quantize import compare_int8, quantize_int8
from semilla.train import train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare_run(tmp_path_factory) -> tuple[Path, Path]:
    """A small llama trained briefly on tinyshakespeare (char-level) and its int8 copy."""
    root = tmp_path_factory.mktemp("int8")
    prepare([str(SHAKESPEARE)], str(root / "data"))
    model_cfg, train_cfg = tiny_configs(
        root / "data",
        root / "run",
        n_embd=64,
        n_head=4,
        block_size=64,
        batch_size=16,
        max_iters=150,
        learning_rate=3e-3,
        warmup_iters=10,
        eval_interval=150,
        save_interval=150,
        sample_interval=150,
    )
    train(model_cfg, train_cfg)
    return root, quantize_int8(root / "run", root / "int8")


def test_perplexity_within_2_percent_and_smaller(shakespeare_run):
    root, int8 = shakespeare_run
    report = compare_int8(root / "run", int8, str(root / "data"), "val", max_tokens=20_000)
    assert report["fp32_perplexity"] < 20  # the model learned something: the check means something
    assert abs(report["perplexity_change"]) < 0.02, report
    assert report["size_ratio"] < 0.6, report
    model, _, config = load_checkpoint(int8)
    assert config["quantization"]["method"] == "dynamic-int8"
    assert "quantized.dynamic" in type(model.model.layers[0].mlp.up_proj).__module__
    print(report)


def test_generate_cli_loads_int8(shakespeare_run):
    _, int8 = shakespeare_run
    proc = run_cli("generate", int8, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)


def test_an_int8_checkpoint_refuses_bfloat16(shakespeare_run):
    _, int8 = shakespeare_run
    proc = run_cli("generate", int8, "--dtype", "bfloat16", "--prompt", "ROMEO:")
    assert_one_line_error(proc, "is an int8 checkpoint: it runs in float32, not bfloat16")


def test_cli_int8_reports_size_and_perplexity(shakespeare_run, tmp_path):
    root, _ = shakespeare_run
    proc = run_cli(
        "export", "int8", root / "run", tmp_path / "q", "--data", root / "data", "--max-tokens", "2000"
    )
    assert proc.returncode == 0, proc.stderr
    assert "of fp32" in proc.stdout and "perplexity" in proc.stdout
