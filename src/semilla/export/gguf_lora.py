"""A LoRA adapter as a GGUF adapter file for llama.cpp's `--lora` (and Ollama's `ADAPTER`).

The layout of llama.cpp's convert_lora_to_gguf.py: `general.type = adapter`, `adapter.type =
lora`, `adapter.lora.alpha`, the base model's architecture, and for each adapted weight
`blk.N.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r), named after the base tensor they
adapt in semilla's GGUF export (export/gguf.py). The same conventions carry over:
- RoPE: the rows of q_proj and k_proj are permuted for llama.cpp, so are those of their B.
- gpt2: q, k, v are one `attn_qkv` tensor, so their adapters become one whose A stacks theirs
  and whose B puts each B in its own rows and columns (zeros elsewhere): the same update.
llama.cpp scales each update by alpha / rank with one alpha for the file. Where every adapted
layer has the same rank and scaling that alpha is the adapter's own; otherwise (gpt2's stacked
qkv, PEFT rank or alpha patterns) each scaling is folded into its B and alpha is 0, which
llama.cpp reads as a scale of 1.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from semilla.atomic import follow_umask, refuse_to_replace
from semilla.export import ExportError, load_float_checkpoint
from semilla.export.gguf import gguf_module, permute_rope
from semilla.export.hf import require_family
from semilla.models.lora import QKV, read_adapter

# semilla's module -> llama.cpp's tensor (q, k, v of the gpt2 family: attn_qkv)
GGUF_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_adapter_pairs(
    model: torch.nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{llama.cpp base tensor name: (A (r, in), B (out, r), scaling)} of a checked adapter."""
    cfg = model.config
    family = require_family(cfg, "GGUF")
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    qkv: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for name, (A, B, scaling) in weights.items():
        index, _, module = name.removeprefix("model.layers.").partition(".")
        A, B = A.float(), B.float()
        if family == "gpt2" and module.rsplit(".", 1)[1] in QKV:
            qkv.setdefault(int(index), {})[module.rsplit(".", 1)[1]] = (A, B, scaling)
            continue
        if family == "llama" and module == "self_attn.q_proj":
            B = permute_rope(B, cfg.n_head)
        elif family == "llama" and module == "self_attn.k_proj":
            B = permute_rope(B, cfg.kv_heads)
        out[f"blk.{index}.{GGUF_MODULES[module]}.weight"] = (A, B, scaling)
    for index, parts in qkv.items():  # scalings folded into B: the stacked ranks differ from r
        n_out = cfg.n_embd
        present = [parts[m] for m in QKV if m in parts]
        rank = sum(A.size(0) for A, _, _ in present)
        B_all = torch.zeros(3 * n_out, rank)
        start = 0
        for m in QKV:
            if m in parts:
                A, B, scaling = parts[m]
                row = QKV.index(m) * n_out
                B_all[row : row + n_out, start : start + A.size(0)] = B * scaling
                start += A.size(0)
        A_all = torch.cat([A for A, _, _ in present])
        out[f"blk.{index}.attn_qkv.weight"] = (A_all, B_all, 1.0)
    return out


def adapter_alpha(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """The file's alpha: the adapter's own where one rank and one scaling hold for every
    tensor, else 0 (each scaling is then folded into its B)."""
    shapes = {(A.size(0), scaling) for A, _, scaling in pairs.values()}
    if len(shapes) == 1:
        rank, scaling = shapes.pop()
        return scaling * rank
    return 0.0


def write_gguf_adapter(
    model: torch.nn.Module,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    path: Path,
    type_name: str,
    name: str,
) -> None:
    """One GGUF LoRA adapter file (F32 or F16) at `path`."""
    gguf = gguf_module()
    logging.getLogger("gguf").setLevel(logging.WARNING)
    family = require_family(model.config, "GGUF")
    pairs = gguf_adapter_pairs(model, weights)
    alpha = adapter_alpha(pairs)
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if type_name == "f32" else "MOSTLY_F16"])
    dtype = "float32" if type_name == "f32" else "float16"
    for tensor_name, (A, B, scaling) in pairs.items():
        B = B if alpha else B * scaling
        writer.add_tensor(tensor_name + ".lora_a", A.contiguous().numpy().astype(dtype))
        writer.add_tensor(tensor_name + ".lora_b", B.contiguous().numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf_adapter(
    checkpoint: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    type_name: str = "f32",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `out` (a .gguf file) from the LoRA adapter directory `adapter` of the llama- or
    gpt2-family `checkpoint` (which the adapter is checked against): llama.cpp loads it with
    `--lora` over `semilla export gguf CHECKPOINT`'s file. Atomic; an existing `out` is
    replaced only with `overwrite`."""
    if type_name not in ("f32", "f16"):
        raise ExportError(f"a GGUF adapter is f32 or f16, got {type_name!r}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(
            f"{out} is a directory; a GGUF adapter is one file: give a path like {out / 'adapter.gguf'}"
        )
    refuse_to_replace(out, overwrite)
    model, _ = load_float_checkpoint(checkpoint)
    require_family(model.config, "GGUF")
    _, weights = read_adapter(model, adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    follow_umask(tmp)
    try:
        write_gguf_adapter(model, weights, Path(tmp), type_name, name or Path(adapter).resolve().name)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
