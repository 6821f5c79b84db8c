"""Models for the generation tests: tiny random transformers/LSTMs and an exact bigram table.

The random models get large weights (std 0.3) so their logits are peaked and depend on the
whole context: a cache or padding bug then changes the tokens instead of hiding in near-ties.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from semilla.api import LanguageModel
from semilla.config import ModelConfig
from semilla.models import build_model
from semilla.tokenizer import Tokenizer

TEXT = (
    "the quick brown fox jumps over the lazy dog. the end.\n"
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme.\n"
)

FAMILIES = {
    "llama": {},
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True),
    "gqa": dict(n_head=4, n_kv_head=1),
    "sinusoidal": dict(norm="layernorm", pos="sinusoidal", mlp="relu", bias=True),
    "lstm": dict(arch="lstm", lstm_hidden=32),
}


def char_tokenizer() -> Tokenizer:
    return Tokenizer.train_char([TEXT])


def tiny_model(tok: Tokenizer, seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer model of the given shape with random, deliberately large weights."""
    shape = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
    cfg = ModelConfig(**{**shape, **overrides})
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def tiny_lm(seed: int = 0, **overrides) -> LanguageModel:
    tok = char_tokenizer()
    return LanguageModel(tiny_model(tok, seed, **overrides), tok, {"path": f"tiny-{seed}"})


class BigramModel(nn.Module):
    """Next-token log-probabilities that depend only on the last token: exact expectations.

    `table[a][b]` is P(b | a); missing entries share a 1e-6 floor. Quacks like a transformer
    for the generation core (config, lm_head for the device, a cache with k/v lists).
    """

    def __init__(self, vocab_size: int, table: dict[int, dict[int, float]], block_size=64):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=block_size)
        self.lm_head = nn.Linear(1, 1)  # only its device is read
        logits = torch.full((vocab_size, vocab_size), math.log(1e-6))
        for a, row in table.items():
            for b, p in row.items():
                logits[a, b] = math.log(p)
        self.register_buffer("logits", logits.log_softmax(-1))

    def new_cache(self, batch_size: int, max_len: int | None = None):
        return SimpleNamespace(k=[], v=[])

    def forward(self, idx, positions=None, cache=None) -> torch.Tensor:
        return self.logits[idx]  # (B, T, V)

    def logprob(self, prev: int, token: int) -> float:
        return float(self.logits[prev, token])
