"""Hugging Face directories: write `LlamaForCausalLM` / `GPT2LMHeadModel` checkpoints that
`transformers` loads offline, and read them back into semilla checkpoints.

A llama-family model is already in Hugging Face's names, so its export is a save. The gpt2
family maps name by name onto GPT-2's layout: fused `c_attn` and `Conv1D` (transposed) weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from semilla.atomic import atomic_directory, refuse_to_replace
from semilla.checkpoint import model_state
from semilla.config import ModelConfig
from semilla.export import ExportError, load_float_checkpoint
from semilla.tokenizer import BOS, END, EOS, PAD, Tokenizer

GPT2_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu"}  # semilla mlp -> HF activation


# GPT-2's per-layer names -> semilla's (Hugging Face Llama's); q/k/v are fused as c_attn there
GPT2_LAYER_NAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def require_family(cfg: ModelConfig, target: str) -> str:
    """'llama' or 'gpt2', or an ExportError naming what keeps the model out of `target`."""
    if cfg.family is not None:
        return cfg.family
    if cfg.arch != "transformer":
        reason = f"an {cfg.arch.upper()} has no {target} architecture"
    else:
        reason = (
            f"norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp}, bias={cfg.bias} is neither the llama family "
            "(rmsnorm, rope, swiglu, no bias) nor the gpt2 family (layernorm, learned, gelu, bias)"
        )
    raise ExportError(f"cannot export to {target}: {reason}")


# --- config.json ----------------------------------------------------------------------------


def special_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    end = tokenizer.token_to_id(END)
    return {
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": [tokenizer.token_to_id(EOS), end],  # <|end|> closes a chat turn
        "pad_token_id": tokenizer.token_to_id(PAD),
    }


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ffn_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "activation_function": GPT2_ACTIVATIONS[cfg.mlp],
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


# --- weights --------------------------------------------------------------------------------


def gpt2_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """semilla names -> GPT2LMHeadModel names; Conv1D weights are stored (in, out)."""
    out = {
        "transformer.wte.weight": state["model.embed_tokens.weight"],
        "transformer.wpe.weight": state["model.embed_positions.weight"],
        "transformer.ln_f.weight": state["model.norm.weight"],
        "transformer.ln_f.bias": state["model.norm.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        s, h = f"model.layers.{i}.", f"transformer.h.{i}."
        qkv = [s + f"self_attn.{p}_proj" for p in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat([state[p + ".weight"] for p in qkv]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([state[p + ".bias"] for p in qkv])
        for theirs, ours in GPT2_LAYER_NAMES.items():
            weight = state[s + ours + ".weight"]
            out[h + theirs + ".weight"] = weight.t() if weight.dim() == 2 else weight
            out[h + theirs + ".bias"] = state[s + ours + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_files(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json contents, safetensors state) of a semilla transformer in HF's layout."""
    cfg: ModelConfig = model.config
    family = require_family(cfg, "Hugging Face")
    state = model_state(model)
    if family == "llama":
        return llama_config(cfg), state
    return gpt2_config(cfg), gpt2_state(state, cfg)


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    adapter: str | os.PathLike | None = None,
) -> Path:
    """Write a Hugging Face model directory (config, safetensors, tokenizer, generation config)
    that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(out)` load offline; with
    `adapter` (a LoRA directory), the adapter merged into the weights. An existing `out` is
    replaced only with `overwrite`."""
    refuse_to_replace(out, overwrite)
    model, tokenizer = load_float_checkpoint(checkpoint)
    if adapter is not None:
        from semilla.models.lora import load_adapter, merge_and_unload

        load_adapter(model, adapter)
        model = merge_and_unload(model)
    config, state = hf_files(model)
    ids = special_ids(tokenizer)
    config.update(ids, torch_dtype="float32", use_cache=True)
    # no max_length: transformers warns when a caller's max_new_tokens meets it
    generation = {**ids, "do_sample": False}
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp, model_max_length=model.config.block_size)
        _write_readme(tmp, config["architectures"][0])
    return Path(out)


def _write_readme(directory: Path, architecture: str) -> None:
    text = (
        f"# semilla model ({architecture})\n\n"
        "Trained with semilla and exported with `semilla export hf`.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n"
    )
    (directory / "README.md").write_text(text, encoding="utf-8")
