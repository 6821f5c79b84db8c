"""Reading a prepared dataset: its splits memory-mapped, random windows for training (targets
outside a chat loss mask ignored), strided windows for evaluation, and weighted mixtures of
several datasets. `data.py` writes what this reads."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from semilla.errors import DataError


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta.json").is_file()


IGNORE_INDEX = -100  # a target that counts in no loss or metric (F.cross_entropy's default)


class TokenDataset:
    """One split of a prepared dataset, memory-mapped: random windows and strided windows.

    loss_mask: targets outside the stored loss mask (chat data: all but the assistant turns)
    become IGNORE_INDEX in random_batch; False trains on every token.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train", loss_mask: bool = True):
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{d} is not a prepared dataset (no meta.json); run `semilla prepare` first")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if split not in meta["splits"]:
            raise DataError(f"{d} has no {split!r} split")
        dtype = np.dtype(meta["dtype"])
        self.split = split
        self.vocab_size = int(meta["vocab_size"])
        self.shards = []
        self.masks: list[np.ndarray] | None = [] if loss_mask and meta.get("loss_mask") else None
        for s in meta["splits"][split]["shards"]:
            path = d / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * dtype.itemsize:
                raise DataError(f"{path} is missing or truncated; prepare the data again")
            if self.masks is not None:
                mask_path = d / s["mask"]
                if not mask_path.is_file() or mask_path.stat().st_size != s["tokens"]:
                    raise DataError(f"{mask_path} is missing or truncated; prepare the data again")
            if s["tokens"]:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
                if self.masks is not None:
                    self.masks.append(np.memmap(d / s["mask"], dtype=np.uint8, mode="r"))
        self.n_tokens = sum(len(s) for s in self.shards)

    def check_block_size(self, block_size: int) -> None:
        longest = max((len(s) for s in self.shards), default=0)
        if longest < block_size + 1:
            raise DataError(
                f"block_size {block_size} is larger than the data: the {self.split} split has "
                f"{longest} tokens, and a window needs block_size + 1; use a smaller --block-size or more text"
            )

    def random_batch(
        self, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): `batch_size` random windows of block_size + 1 tokens, y shifted by one;
        targets outside the loss mask are IGNORE_INDEX."""
        lengths = torch.tensor([len(s) - block_size - 1 for s in self.shards], dtype=torch.float64)
        usable = (lengths >= 0).double() * (lengths + 1)
        if len(self.shards) == 1:
            shard_ids = [0] * batch_size
        else:
            shard_ids = torch.multinomial(usable, batch_size, replacement=True, generator=generator).tolist()
        rows, keeps = [], []
        for s in shard_ids:
            start = int(torch.randint(int(usable[s]), (1,), generator=generator))
            rows.append(torch.from_numpy(self.shards[s][start : start + block_size + 1].astype(np.int64)))
            if self.masks is not None:  # a token's mask says whether predicting it counts
                keeps.append(torch.from_numpy(self.masks[s][start + 1 : start + block_size + 1].astype(bool)))
        batch = torch.stack(rows)
        # copies: for one row both slices are already contiguous views of `batch`, and masking y
        # must not write IGNORE_INDEX into x
        x, y = batch[:, :-1].clone(), batch[:, 1:].clone()
        if keeps:
            y[~torch.stack(keeps)] = IGNORE_INDEX
        return x, y

    def strided_windows(self, block_size: int, stride: int | None = None) -> Iterator[torch.Tensor]:
        """Every window of block_size + 1 tokens, `stride` apart (robo-poet: 100/50)."""
        stride = stride or block_size
        for shard in self.shards:
            for start in range(0, max(1, len(shard) - block_size), stride):
                window = shard[start : start + block_size + 1]
                if len(window) >= 2:
                    yield torch.from_numpy(window.astype(np.int64))


# --- weighted mixtures --------------------------------------------------------------------


def parse_mixture(spec: str) -> list[tuple[str, float]] | None:
    """`new:0.7,old:0.3` -> [("new", 0.7), ("old", 0.3)]; None for plain data (no weights).
    A part that names an existing file or folder is a path, even with a colon in its name."""
    parts = spec.split(",")
    if not any(":" in part and not Path(part).exists() for part in parts):
        return None
    sources = []
    for part in parts:
        path, _, weight = part.rpartition(":")
        if not path:
            raise DataError(
                f"--data mixture: {part!r} has no weight; write every source as PATH:WEIGHT, e.g. new:0.7,old:0.3"
            )
        try:
            value = float(weight)
        except ValueError:
            raise DataError(
                f"--data mixture: the weight of {path} must be a number, got {weight!r}"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"--data mixture: the weight of {path} must be >= 0, got {weight}")
        sources.append((path, value))
    if not sum(w for _, w in sources) > 0:
        raise DataError(f"--data mixture: the weights of {spec} sum to 0; give a source a positive weight")
    return sources


class MixtureDataset:
    """Several datasets of one tokenizer; each batch row comes from a source picked by weight."""

    def __init__(self, sources: list[TokenDataset], weights: list[float]):
        self.sources = sources
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.n_tokens = sum(s.n_tokens for s in sources)

    def check_block_size(self, block_size: int) -> None:
        for source in self.sources:
            source.check_block_size(block_size)

    def random_batch(
        self, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like TokenDataset.random_batch; the sources are drawn with the same generator."""
        picks = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        x = torch.empty(batch_size, block_size, dtype=torch.int64)
        y = torch.empty(batch_size, block_size, dtype=torch.int64)
        for i, source in enumerate(self.sources):
            rows = (picks == i).nonzero().flatten()
            if len(rows):
                x[rows], y[rows] = source.random_batch(len(rows), block_size, generator)
        return x, y
