"""ONNX export: onnx.checker accepts the file and ONNX Runtime's logits equal PyTorch's
within 1e-4, at a batch size and sequence length other than the export example's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_helpers import MULTILINGUAL, PROMPT, save_tiny

from semilla.checkpoint import load_checkpoint
from semilla.export import ExportError
from semilla.export.onnx import export_onnx


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_onnxruntime_logits_match_pytorch(tmp_path, family):
    ckpt = save_tiny(tmp_path / "ckpt", family, "bpe")
    model, tok, _ = load_checkpoint(ckpt)
    out = export_onnx(ckpt, tmp_path / "onnx")
    onnx.checker.check_model(str(out / "model.onnx"))
    assert json.loads((out / "config.json").read_text())["block_size"] == 128
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n_rows, n_tokens in ((1, 5), (3, 37)):
        ids = tok.encode(PROMPT + MULTILINGUAL)
        x = torch.tensor([ids[i : i + n_tokens] for i in range(n_rows)])
        (logits,) = session.run(None, {"input_ids": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() < 1e-4


def test_lstm_is_refused(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", "llama", "char", arch="lstm", lstm_hidden=16)
    with pytest.raises(ExportError, match="LSTM"):
        export_onnx(ckpt, tmp_path / "onnx")
