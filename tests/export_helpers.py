"""Models and tokenizers for the export tests: tiny random transformers with peaked logits
(no near-ties, so greedy parity is a real check), char and BPE tokenizers, and a semilla
greedy decoder to compare other runtimes against."""

from __future__ import annotations

from pathlib import Path

import torch
from generation_helpers import TEXT, tiny_model

from semilla.checkpoint import save_checkpoint
from semilla.config import GenerateConfig
from semilla.generate import generate
from semilla.tokenizer import Tokenizer

MULTILINGUAL = (
    "En un lugar de la Mancha, ¿qué niño comió piñata? Über die Straße. Ça va très bien, l'été. "
    "Ελληνικά και русский текст. 日本語のテキスト、中文。 Emoji 🌱🚀 and code: x = f(y) + 42;\n"
)
# Text llama.cpp must tokenize like semilla: every character is in the char vocabulary.
PROMPT = "the quick brown fox jumps over the"

FAMILIES = {
    "llama": dict(n_head=4, n_kv_head=2),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True),
}


def tokenizer_of(kind: str) -> Tokenizer:
    texts = [TEXT, MULTILINGUAL] * 3
    return Tokenizer.train_char(texts) if kind == "char" else Tokenizer.train_bpe(texts, vocab_size=320)


def save_tiny(directory: Path, family: str, kind: str, seed: int = 0, **overrides) -> Path:
    """A tiny random model of `family` with a `kind` tokenizer, saved as a checkpoint."""
    tok = tokenizer_of(kind)
    model = tiny_model(tok, seed, block_size=128, **{**FAMILIES[family], **overrides})
    return save_checkpoint(directory, model, tok)


def greedy(model: torch.nn.Module, prompt: list[int], n: int = 64) -> list[int]:
    """semilla's own greedy continuation (KV cache), never stopping early."""
    cfg = GenerateConfig(max_new_tokens=n, temperature=0.0)
    return generate(model, [prompt], cfg, stop_ids=())[0].tokens
