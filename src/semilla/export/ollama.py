"""Ollama: a GGUF file plus a Modelfile beside it, ready for `ollama create`.

The TEMPLATE is the Go-template form of semilla's chat template
(`<|role|>content<|end|>` per message, then `<|assistant|>`), and `<|end|>` / `<eos>` are
stop sequences, so Ollama formats and ends turns exactly like `semilla chat`. With a LoRA
adapter, `adapter.gguf` sits beside the model and the Modelfile's ADAPTER line names it.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from semilla.atomic import atomic_directory, refuse_to_replace
from semilla.checkpoint import read_config, resolve_checkpoint
from semilla.export import ExportError
from semilla.export.gguf import export_gguf
from semilla.tokenizer import END, EOS

GGUF_NAME = "model.gguf"
ADAPTER_NAME = "adapter.gguf"
TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"


@dataclass
class OllamaOptions:
    """What the Modelfile sets; None leaves Ollama's default."""

    system: str | None = None
    temperature: float | None = 0.8
    top_p: float | None = 0.95
    num_ctx: int | None = None  # None: the model's context length

    def problems(self, block_size: int) -> list[str]:
        p = []
        if self.temperature is not None and self.temperature < 0:
            p.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            p.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_ctx is not None and not 1 <= self.num_ctx <= block_size:
            p.append(f"--num-ctx must be in [1, {block_size}] (the model's context), got {self.num_ctx}")
        return p


def quote(text: str) -> str:
    """A Modelfile string: triple quotes, which may hold newlines and single quotes."""
    if '"""' in text:
        raise ExportError('the system prompt may not contain """ (a Modelfile cannot quote it)')
    return f'"""{text}"""'


def modelfile(options: OllamaOptions, block_size: int, adapter: bool = False) -> str:
    lines = [f"FROM ./{GGUF_NAME}", *([f"ADAPTER ./{ADAPTER_NAME}"] if adapter else [])]
    lines.append(f"TEMPLATE {quote(TEMPLATE)}")
    if options.system:
        lines.append(f"SYSTEM {quote(options.system)}")
    for stop in (END, EOS):
        lines.append(f'PARAMETER stop "{stop}"')
    if options.temperature is not None:
        lines.append(f"PARAMETER temperature {options.temperature}")
    if options.top_p is not None:
        lines.append(f"PARAMETER top_p {options.top_p}")
    lines.append(f"PARAMETER num_ctx {options.num_ctx or block_size}")
    return "\n".join(lines) + "\n"


def export_ollama(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    options: OllamaOptions | None = None,
    type_name: str = "q8_0",
    name: str | None = None,
    overwrite: bool = False,
    adapter: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """Write `out/model.gguf` and `out/Modelfile` (with `adapter`, a LoRA directory, also
    `out/adapter.gguf` and an ADAPTER line); returns (out, the `ollama create` command). An
    existing `out` is replaced only with `overwrite`."""
    refuse_to_replace(out, overwrite)
    options = options or OllamaOptions()
    config = read_config(resolve_checkpoint(checkpoint))
    block_size = config["model"]["block_size"]
    problems = options.problems(block_size)
    if problems:
        raise ExportError("; ".join(problems))
    out = Path(out)
    name = name or out.resolve().name
    with atomic_directory(out) as tmp:
        export_gguf(checkpoint, tmp / GGUF_NAME, type_name, name)
        if adapter is not None:
            from semilla.export.gguf_lora import export_gguf_adapter

            export_gguf_adapter(
                checkpoint, adapter, tmp / ADAPTER_NAME, "f32" if type_name == "f32" else "f16"
            )
        text = modelfile(options, block_size, adapter is not None)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    command = f"ollama create {shlex.quote(name)} -f {shlex.quote(str(out / 'Modelfile'))}"
    return out, command
