"""Take a semilla model anywhere: Hugging Face directories (both ways), GGUF for llama.cpp and
Ollama, ONNX, and int8 checkpoints. One module per format; the CLI lives in `export/cli.py`.

from semilla.export.hf import export_hf, import_hf
from semilla.export.gguf import export_gguf
"""

from semilla.errors import SemillaError


class ExportError(SemillaError):
    """A model cannot be written to (or read from) another format; the message says why."""


def load_float_checkpoint(path):
    """(model, tokenizer) of a checkpoint to export; int8 checkpoints are refused (their float
    source exports losslessly)."""
    from semilla.checkpoint import load_checkpoint

    model, tokenizer, config = load_checkpoint(path)
    if config.get("quantization"):
        raise ExportError(f"{path} is an int8 checkpoint; export the float checkpoint it was made from")
    return model, tokenizer
