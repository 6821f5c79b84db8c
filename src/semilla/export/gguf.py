"""GGUF for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's own writer).

The llama family becomes llama.cpp's `llama` architecture, the gpt2 family its `gpt2`. Two
conventions differ from Hugging Face's and are handled here:
- RoPE: llama.cpp's llama rotates interleaved pairs (x0, x1), HF rotate-half pairs (x_i,
  x_{i+d/2}); permuting the rows of q_proj and k_proj per head makes both compute the same
  function (what llama.cpp's convert_hf_to_gguf.py does).
- Tokenizer: byte-level BPE is the `gpt2` tokenizer model (vocab + merges). The char-level
  tokenizer is written as a SentencePiece-style (`llama`) vocabulary with only
  single-character pieces, so llama.cpp can only ever split text into characters, exactly
  like semilla (a space is the piece '▁', as SentencePiece writes it).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from semilla.atomic import follow_umask, refuse_to_replace
from semilla.config import ModelConfig
from semilla.export import ExportError, load_float_checkpoint
from semilla.export.hf import require_family
from semilla.tokenizer import BOS, END, EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def gguf_module():
    try:
        import gguf
    except ImportError as e:
        raise ExportError("GGUF export needs the gguf package: pip install 'semilla[export]'") from e
    return gguf


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k_proj from HF's rotate-half order to llama.cpp's interleaved-pair order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """semilla weights under llama.cpp's tensor names, in the order llama.cpp expects."""
    cfg: ModelConfig = model.config
    family = require_family(cfg, "GGUF")
    s = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": s["model.embed_tokens.weight"]}
    if family == "gpt2":
        out["position_embd.weight"] = s["model.embed_positions.weight"]
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        if family == "llama":
            out[b + "attn_q.weight"] = permute_rope(s[p + "self_attn.q_proj.weight"], cfg.n_head)
            out[b + "attn_k.weight"] = permute_rope(s[p + "self_attn.k_proj.weight"], cfg.kv_heads)
            out[b + "attn_v.weight"] = s[p + "self_attn.v_proj.weight"]
            names["ffn_gate"] = "mlp.gate_proj"
        else:  # gpt2: one fused qkv projection
            for suffix in ("weight", "bias"):
                parts = [s[p + f"self_attn.{x}_proj.{suffix}"] for x in "qkv"]
                out[b + f"attn_qkv.{suffix}"] = torch.cat(parts)
        for theirs, ours in names.items():
            for suffix in ("weight", "bias"):
                if p + f"{ours}.{suffix}" in s:
                    out[b + f"{theirs}.{suffix}"] = s[p + f"{ours}.{suffix}"]
    out["output_norm.weight"] = s["model.norm.weight"]
    if "model.norm.bias" in s:
        out["output_norm.bias"] = s["model.norm.bias"]
    out["output.weight"] = s["lm_head.weight"]  # written even when tied: every llama.cpp reads it
    return out


def add_architecture(writer, cfg: ModelConfig, family: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_size)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if family == "llama":
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Vocabulary, merges (BPE), special ids and chat template as llama.cpp reads them."""
    gguf = gguf_module()
    kinds = gguf.TokenType
    tokens, types = [], []
    special = set(SPECIAL_TOKENS)
    for i in range(vocab_size):
        piece = tokenizer.id_to_token(i)
        if piece is None:  # rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(kinds.UNUSED)
            continue
        if piece in special:
            types.append(kinds.UNKNOWN if piece == UNK else kinds.CONTROL)
        else:
            types.append(kinds.NORMAL)
            if tokenizer.kind == "char":
                piece = piece.replace(" ", "\u2581")
        tokens.append(piece)
    if tokenizer.kind == "char":
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_add_space_prefix(False)
    else:
        merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.token_to_id(BOS))
    writer.add_eos_token_id(tokenizer.token_to_id(EOS))
    writer.add_unk_token_id(tokenizer.token_to_id(UNK))
    writer.add_pad_token_id(tokenizer.token_to_id(PAD))
    writer.add_eot_token_id(tokenizer.token_to_id(END))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def encode_tensor(t: torch.Tensor, type_name: str):
    """(array, raw dtype) of one tensor: 1-D tensors stay F32; a matrix whose rows do not
    fill whole quantization blocks falls back to F16, as llama.cpp's converter does."""
    gguf = gguf_module()
    a = t.numpy().astype(np.float32)
    if type_name == "f32" or a.ndim == 1:
        return a, None
    if type_name == "f16":
        return a.astype(np.float16), None
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, qtype), qtype


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, path: Path, type_name: str, name: str) -> None:
    """Write one GGUF file (F32, F16, Q8_0 or Q4_0) at `path`."""
    gguf = gguf_module()
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer narrates every file at INFO
    cfg: ModelConfig = model.config
    family = require_family(cfg, "GGUF")
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[type_name]])
    add_architecture(writer, cfg, family)
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    for tensor_name, t in gguf_tensors(model).items():
        data, raw_dtype = encode_tensor(t, type_name)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_k(source: Path, dest: Path) -> None:
    """Q4_K_M through llama.cpp's own quantizer (k-quants have no Python writer)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError("--type q4_k_m uses llama.cpp's quantizer: pip install llama-cpp-python") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params) != 0:
        raise ExportError(f"llama.cpp could not quantize {source} to Q4_K_M")


def export_gguf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    type_name: str = "f32",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `out` (a .gguf file) from a llama- or gpt2-family checkpoint; atomic. An existing
    `out` is replaced only with `overwrite`."""
    if type_name not in TYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(TYPES)}, got {type_name!r}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a directory; GGUF is one file: give a path like {out / 'model.gguf'}")
    refuse_to_replace(out, overwrite)
    model, tokenizer = load_float_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = name or Path(checkpoint).resolve().name
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    follow_umask(tmp)
    try:
        if type_name == "q4_k_m":
            f32 = Path(tmp + ".f32")
            try:
                write_gguf(model, tokenizer, f32, "f32", name)
                quantize_k(f32, Path(tmp))
            finally:
                f32.unlink(missing_ok=True)
        else:
            write_gguf(model, tokenizer, Path(tmp), type_name, name)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
