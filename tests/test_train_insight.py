"""Training insight: weight and gradient histograms per evaluation and the token-embedding
projector in TensorBoard (read back with TensorBoard's own reader), and gradient-norm spikes
flagged in metrics.jsonl and the log."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from helpers import tiny_configs
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from semilla.tokenizer import Tokenizer
from semilla.train import train
from semilla.train_insight import SPIKE_MIN_HISTORY, SPIKE_WINDOW, token_label


def rows(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_tensorboard_holds_weight_and_gradient_histograms_and_a_labelled_projector(tmp_path, prepared_dir):
    run = tmp_path / "run"
    train(*tiny_configs(prepared_dir, run, max_iters=8, eval_interval=4, save_interval=8))
    weights = load_file(str(run / "last" / "model.safetensors"))  # the weights of the evaluation at step 8
    events = EventAccumulator(str(run / "tb"), size_guidance={HISTOGRAMS: 0}).Reload()
    tags = set(events.Tags()["histograms"])
    assert {f"weights/{name}" for name in weights} <= tags
    assert {f"gradients/{name}" for name in weights} <= tags
    for name, w in weights.items():
        steps = events.Histograms(f"weights/{name}")
        assert [e.step for e in steps] == [4, 8]
        final = steps[-1].histogram_value
        assert final.num == w.numel()
        assert (final.min, final.max) == pytest.approx((float(w.min()), float(w.max())), abs=1e-6)
        assert final.sum == pytest.approx(float(w.double().sum()), rel=1e-4, abs=1e-3)
        grads = events.Histograms(f"gradients/{name}")
        assert [e.step for e in grads] == [4, 8] and grads[-1].histogram_value.num == w.numel()
    assert any(
        e.histogram_value.max > e.histogram_value.min for e in events.Histograms("gradients/lm_head.weight")
    )

    config = text_format.Parse((run / "tb" / "projector_config.pbtxt").read_text(), ProjectorConfig())
    [embedding] = config.embeddings
    assert "token_embeddings" in embedding.tensor_name
    table = np.loadtxt(run / "tb" / embedding.tensor_path, delimiter="\t")
    np.testing.assert_allclose(table, weights["model.embed_tokens.weight"].numpy(), atol=1e-5)
    labels = (run / "tb" / embedding.metadata_path).read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer.load(run / "last")
    assert labels == [token_label(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)]
    assert "a" in labels and "\\n" in labels  # a character, and the line break shown, not broken


def test_gradient_norm_spikes_are_flagged_in_metrics_and_the_log(tmp_path, prepared_dir, caplog):
    """The oracle: a step is flagged exactly when its norm (logged each step) is over the factor
    times the median of the norms of up to SPIKE_WINDOW steps before it."""
    factor, run = 1.0, tmp_path / "run"  # half the steps: any norm over the median
    with caplog.at_level(logging.INFO, logger="semilla.train"):
        train(*tiny_configs(prepared_dir, run, max_iters=40, log_interval=5, grad_spike_factor=factor))
    spikes = {r["step"]: r for r in rows(run, "grad_spike")}
    straight = tmp_path / "straight"  # the same run logging every step: every norm, to recompute from
    train(*tiny_configs(prepared_dir, straight, max_iters=40, log_interval=1, grad_spike_factor=0))
    norms = [r["grad_norm"] for r in rows(straight, "train")]
    assert rows(straight, "grad_spike") == []  # factor 0: off
    expected = set()
    for step in range(SPIKE_MIN_HISTORY + 1, len(norms) + 1):
        median = statistics.median(norms[max(0, step - 1 - SPIKE_WINDOW) : step - 1])
        if abs(norms[step - 1] / median - factor) > 1e-3 and norms[step - 1] > factor * median:
            expected.add(step)
    assert expected and set(spikes) >= expected and len(set(spikes) - expected) <= 1
    for step, row in spikes.items():
        assert row["grad_norm"] == pytest.approx(norms[step - 1], rel=1e-5)
        assert row["ratio"] > factor and row["ratio"] == pytest.approx(
            row["grad_norm"] / row["median"], rel=1e-4
        )
    first = min(spikes)
    assert f"step {first} grad_spike: grad_norm" in caplog.text
