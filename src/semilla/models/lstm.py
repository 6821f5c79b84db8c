"""LSTM language model (robo-poet's default: embedding 128, 2x LSTM 256, dropout 0.3)."""

from __future__ import annotations

import torch
from torch import nn

from semilla.config import ModelConfig


class LSTMState:
    """The (h, c) state carried between calls during generation; plays the KV cache's part."""

    def __init__(self) -> None:
        self.hc: tuple[torch.Tensor, torch.Tensor] | None = None


class LSTMLanguageModel(nn.Module):
    """`model(idx)` -> logits (B, T, vocab). With a state, each call continues the last."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be set before building a model"
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.lstm = nn.LSTM(
            cfg.n_embd,
            cfg.lstm_hidden,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.lstm_hidden, cfg.vocab_size, bias=True)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> LSTMState:
        return LSTMState()

    def forward(self, idx: torch.Tensor, positions=None, cache: LSTMState | None = None) -> torch.Tensor:
        x = self.embed_tokens(idx)  # (B, T, n_embd)
        hc = cache.hc if cache is not None else None
        y, hc = self.lstm(x, hc)  # (B, T, hidden)
        if cache is not None:
            cache.hc = hc
        return self.lm_head(self.dropout(y))
