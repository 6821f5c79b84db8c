"""`semilla import hf DIR OUT`: a local Llama- or GPT-2-architecture Hugging Face directory
becomes a semilla checkpoint (the inverse of `export_hf`).

Weights must be safetensors (a `.bin` file is a pickle, which semilla never loads). A
tokenizer without semilla's special and chat tokens gets them appended, and the embedding
grows by as many rows, initialized to the mean embedding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from semilla.atomic import refuse_to_replace
from semilla.checkpoint import save_checkpoint
from semilla.config import ModelConfig
from semilla.export import ExportError
from semilla.export.hf import GPT2_LAYER_NAMES
from semilla.models import build_model
from semilla.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

HF_TO_GPT2_MLP = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ExportError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e


def llama_model_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a LlamaForCausalLM config.json; unsupported variants are refused."""
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (semilla's llama uses silu)")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention or MLP biases")
    if hf.get("head_dim", n_embd // n_head) * n_head != n_embd:
        problems.append(f"head_dim {hf['head_dim']} * {n_head} heads != hidden_size {n_embd}")
    if problems:
        raise ExportError(f"cannot import this Llama model: {'; '.join(problems)} not supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        intermediate_size=hf["intermediate_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
    )


def gpt2_model_config(hf: dict[str, Any], tied: bool) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_TO_GPT2_MLP:
        raise ExportError(f"cannot import this GPT-2 model: activation {act!r} is not supported")
    n_embd = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", 1024),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        norm="layernorm",
        pos="learned",
        mlp=HF_TO_GPT2_MLP[act],
        bias=True,
        tie_embeddings=tied,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index names."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = [p.name for p in directory.glob("*.bin")]
        hint = f" ({bins[0]} is a pickle; save it with safe_serialization=True)" if bins else ""
        raise ExportError(f"{directory} has no model.safetensors{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(directory / name)))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{directory / name} cannot be read: {e}") from e
    return {k: v.float() for k, v in tensors.items()}


def gpt2_to_semilla(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel names (with or without the `transformer.` prefix) -> semilla names."""
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    out = {
        "model.embed_tokens.weight": t["wte.weight"],
        "model.embed_positions.weight": t["wpe.weight"],
        "model.norm.weight": t["ln_f.weight"],
        "model.norm.bias": t["ln_f.bias"],
        "lm_head.weight": t.get("lm_head.weight", t["wte.weight"]),
    }
    for i in range(cfg.n_layer):
        h, s = f"h.{i}.", f"model.layers.{i}."
        q, k, v = t[h + "attn.c_attn.weight"].t().split(cfg.n_embd)
        qb, kb, vb = t[h + "attn.c_attn.bias"].split(cfg.n_embd)
        for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[s + f"self_attn.{name}_proj.weight"], out[s + f"self_attn.{name}_proj.bias"] = w, b
        for theirs, ours in GPT2_LAYER_NAMES.items():
            w = t[h + theirs + ".weight"]
            out[s + ours + ".weight"] = w.t() if w.dim() == 2 else w
            out[s + ours + ".bias"] = t[h + theirs + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


def adopt_tokenizer(directory: Path) -> Tokenizer:
    """The directory's tokenizer.json, with any of semilla's special tokens it lacks appended."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{directory} has no tokenizer.json (a fast tokenizer file is needed)")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception on bad files
        raise ExportError(f"{path} cannot be read: {str(e).splitlines()[0]}") from e
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens(missing)
    kind = config.get("semilla_tokenizer_kind") or (
        "char" if isinstance(hf.model, models.WordLevel) else "bpe"
    )
    template = config.get("chat_template") if not missing else None
    return Tokenizer(hf, kind, template or CHAT_TEMPLATE)


def grow_vocab(tensors: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Pad embedding and head rows up to vocab_size with the mean row (new special tokens)."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = tensors.get(key)
        if w is not None and w.size(0) < vocab_size:
            extra = w.mean(0, keepdim=True).expand(vocab_size - w.size(0), -1)
            tensors[key] = torch.cat([w, extra])
    return tensors


def import_hf(directory: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Turn a local LlamaForCausalLM or GPT2LMHeadModel directory into a semilla checkpoint; an
    existing `out` is replaced only with `overwrite`."""
    refuse_to_replace(out, overwrite)
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"Hugging Face model directory not found: {d}")
    hf = read_hf_config(d)
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    if arch not in ("LlamaForCausalLM", "llama", "GPT2LMHeadModel", "gpt2"):
        raise ExportError(f"cannot import {arch}: only LlamaForCausalLM and GPT2LMHeadModel are supported")
    tensors = read_weights(d)
    if arch in ("LlamaForCausalLM", "llama"):
        cfg = llama_model_config(hf)
        tensors = {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))}
        tensors = {k: v for k, v in tensors.items() if "rotary_emb" not in k}
    else:
        tied = "lm_head.weight" not in tensors or bool(hf.get("tie_word_embeddings", True))
        cfg = gpt2_model_config(hf, tied)
        tensors = gpt2_to_semilla(tensors, cfg)
    tokenizer = adopt_tokenizer(d)
    cfg.vocab_size = max(cfg.vocab_size, tokenizer.vocab_size)
    tensors = grow_vocab(tensors, cfg.vocab_size)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(
            f"{d} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return save_checkpoint(out, model.eval(), tokenizer)
