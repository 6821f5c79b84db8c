"""ONNX: the forward pass (token ids -> logits) for ONNX Runtime and other edge runtimes.

Exported with `torch.onnx` (the dynamo exporter), batch and sequence dimensions dynamic,
checked with `onnx.checker`. Inputs: `input_ids` int64 (batch, seq); output: `logits` float32
(batch, seq, vocab). The tokenizer files are written beside the model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from semilla.atomic import atomic_directory, refuse_to_replace
from semilla.export import ExportError, load_float_checkpoint


class LogitsOnly(torch.nn.Module):
    """The model with positions fixed to 0..T-1: one tensor in, one tensor out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def export_onnx(
    checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = 18, overwrite: bool = False
) -> Path:
    """Write `out/model.onnx` (+ tokenizer files and semilla's config) from a checkpoint; an
    existing `out` is replaced only with `overwrite`."""
    refuse_to_replace(out, overwrite)
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'semilla[export]'") from e
    model, tokenizer = load_float_checkpoint(checkpoint)
    cfg = model.config
    if cfg.arch != "transformer":
        raise ExportError("cannot export to ONNX: only transformer models are supported, not an LSTM")
    example = torch.zeros(1, min(8, cfg.block_size), dtype=torch.long)
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=cfg.block_size)
    # the exporter warns about optional torchvision ops and narrates its steps: keep it quiet
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with atomic_directory(out) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            LogitsOnly(model).eval(),
            (example,),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        program.save(str(tmp / "model.onnx"))
        onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)
        tokenizer.save(tmp)
        info = {"block_size": cfg.block_size, "vocab_size": cfg.vocab_size, "inputs": ["input_ids"]}
        (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Path(out)
