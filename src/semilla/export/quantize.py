"""`semilla export int8`: a checkpoint whose transformer-block weights are int8 (see
models/int8.py), for CPU inference on small machines. `semilla generate`, `chat` and `serve`
load it like any checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from semilla.api import LanguageModel
from semilla.atomic import atomic_directory, refuse_to_replace
from semilla.checkpoint import load_checkpoint, resolve_checkpoint
from semilla.export import ExportError, load_float_checkpoint
from semilla.models.int8 import METHOD, int8_state, quantizable_layers


def quantize_int8(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an int8 copy of a transformer checkpoint to `out` (atomic); an existing `out` is
    replaced only with `overwrite`."""
    refuse_to_replace(out, overwrite)
    model, tokenizer = load_float_checkpoint(checkpoint)
    if not quantizable_layers(model):
        raise ExportError("int8 export needs a transformer; an LSTM has no layers to quantize")
    source = resolve_checkpoint(checkpoint)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["quantization"] = METHOD
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(int8_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
    return Path(out)


def compare_int8(
    checkpoint: str | os.PathLike,
    int8_checkpoint: str | os.PathLike,
    data: str | None = None,
    split: str = "val",
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Weight-file sizes and, with `data` (a prepared dataset or text file), the perplexity
    of both checkpoints on the same tokens."""
    from semilla.evaluate import likelihood_metrics, load_eval_tokens

    report: dict[str, Any] = {}
    paths = {"fp32": resolve_checkpoint(checkpoint), "int8": resolve_checkpoint(int8_checkpoint)}
    for kind, path in paths.items():
        report[f"{kind}_bytes"] = (path / "model.safetensors").stat().st_size
        if data is not None:
            lm = LanguageModel(*load_checkpoint(path))
            ids, chars, _ = load_eval_tokens(lm, data, split)
            report[f"{kind}_perplexity"] = likelihood_metrics(lm, ids, chars, max_tokens=max_tokens)[
                "perplexity"
            ]
    report["size_ratio"] = report["int8_bytes"] / report["fp32_bytes"]
    if data is not None:
        report["perplexity_change"] = report["int8_perplexity"] / report["fp32_perplexity"] - 1
    return report
