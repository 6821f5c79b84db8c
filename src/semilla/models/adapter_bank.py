"""Many LoRA adapters on one base model at once: each row of a batch with its own adapter, or
none, in one forward (what S-LoRA and Punica do for GPUs).

The base weights are never touched, so the base matmul keeps every fast path (FusedLinear's
stacked, prepacked weights; the few-rows CPU kernel) for all rows; the adapters add their
low-rank updates on top. For each FusedLinear (q/k/v, gate/up, o, down) the bank lays the
adapters it holds side by side:

    A_all (in, R)      every held adapter's A^T for the fused layers it adapts; R = their ranks summed
    B_all (R, out)     each adapter's B^T in its own rows, in the output columns of its layer
    table (S + 1, R)   row s: adapter s's scaling on its own columns, zeros elsewhere (row 0: none)

and a forward adds `((x @ A_all) * table[slot of the row]) @ B_all`: two matmuls for the whole
batch, whatever its mix of adapters. A row's other columns are exact zeros, so each row gets
exactly its own adapter's update, and a row without one gets the base model's output.

The engine's view (`AdapterBank`): adapters registered by name (a PEFT directory each), at most
`max_held` loaded at once, the least recently used idle one dropped (and read again when asked
for); one in use by rows stays until they finish, even once unregistered. Registration and use
come from request threads while the scheduler thread runs forwards: every change builds a new
`HeldAdapters` and swaps it in, so a forward always sees one consistent set.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from semilla.models.lora import AdapterError, read_adapter
from semilla.models.transformer import FusedLinear

# {semilla module name: (A (r, in), B (out, r), scaling)}, as lora.read_adapter gives it
AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class UnknownAdapterError(AdapterError):
    """A request names an adapter that is not registered."""


class AdaptersBusyError(AdapterError):
    """Every adapter slot in memory is taken by running rows: another must wait its turn."""


def fused_layers(model: nn.Module) -> list[tuple[FusedLinear, list[str], list[int]]]:
    """Every FusedLinear of `model` with its layers' module names and output sizes."""
    found = []
    for prefix, module in model.named_modules():
        for fused in vars(module).values():
            if isinstance(fused, FusedLinear) and fused is not getattr(model, "head", None):
                names = [f"{prefix}.{n}" for n in fused.names]
                found.append((fused, names, [module._modules[n].out_features for n in fused.names]))
    return found


@dataclass(frozen=True)
class HeldAdapters:
    """The adapters loaded at one moment, laid out for batched forwards (never changed)."""

    slots: dict[str, int]  # adapter name -> its row of every table (0 is no adapter)
    layers: dict[FusedLinear, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # A_all, B_all, table
    # the columns of the adapters a batch uses, by their slots: a batch pays for its own
    # adapters only, not for every one held (the scheduler thread's cache; rows change rarely)
    used: dict[tuple[int, ...], dict] = field(default_factory=dict, compare=False)

    def rows(self, names: list[str | None], device: torch.device) -> RowAdapters | None:
        """The adapters of a batch whose row i uses names[i] (None: the base model); None when
        no row uses one."""
        if not any(names):
            return None
        slots = [self.slots[n] if n else 0 for n in names]
        key = tuple(sorted(set(slots) - {0}))
        if key not in self.used:
            if len(self.used) >= 64:  # many mixes seen: start again rather than grow
                self.used.clear()
            self.used[key] = self._columns_of(key)
        return RowAdapters(self.used[key], torch.tensor(slots, device=device))

    def _columns_of(self, slots: tuple[int, ...]) -> dict:
        """The layout cut to these adapters' columns (layers none of them adapts left out)."""
        layers = {}
        for fused, (A, B, table) in self.layers.items():
            columns = table[list(slots)].ne(0).any(0).nonzero().squeeze(1)
            if len(columns):
                layers[fused] = (
                    A[:, columns].contiguous(),
                    B[columns].contiguous(),
                    table[:, columns].contiguous(),
                )
        return layers


@dataclass(frozen=True)
class RowAdapters:
    """One forward's adapters: the held layout and each row's slot, (B,)."""

    layers: dict[FusedLinear, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    slots: torch.Tensor

    def add(self, fused: FusedLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (B, T, out), the base output for x (B, T, in), plus each row's adapter update."""
        A, B, table = self.layers[fused]
        h = (x @ A) * table[self.slots].unsqueeze(1)  # (B, T, R): other adapters' columns zero
        return torch.addmm(y.reshape(-1, y.size(-1)), h.reshape(-1, h.size(-1)), B).view(y.shape)


def layout(
    fused: list[tuple[FusedLinear, list[str], list[int]]],
    adapters: list[AdapterWeights],
    like: torch.Tensor,
) -> dict[FusedLinear, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A_all, B_all and the scaling table of every FusedLinear some adapter adapts (adapter i
    in slot i + 1), in `like`'s dtype and device."""
    layers = {}
    for layer, names, sizes in fused:
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        a_parts, b_parts, owners = [], [], []  # owners: (slot, scaling, rank) per block of columns
        for slot, weights in enumerate(adapters, start=1):
            for name, offset, size in zip(names, offsets, sizes, strict=True):
                if name not in weights:
                    continue
                A, B, scaling = weights[name]
                block = B.new_zeros(A.size(0), sum(sizes))  # (r, out): B^T in this layer's columns
                block[:, offset : offset + size] = B.T
                a_parts.append(A.T)
                b_parts.append(block)
                owners.append((slot, scaling, A.size(0)))
        if not owners:
            continue
        table = torch.zeros(len(adapters) + 1, sum(r for _, _, r in owners))
        start = 0
        for slot, scaling, rank in owners:
            table[slot, start : start + rank] = scaling
            start += rank
        layers[layer] = tuple(
            t.to(like).contiguous() for t in (torch.cat(a_parts, dim=1), torch.cat(b_parts), table)
        )
    return layers


class AdapterBank:
    """The adapters one served model may run with, by name; at most `max_held` in memory."""

    def __init__(self, model: nn.Module, max_held: int = 8):
        if max_held < 1:
            raise AdapterError(f"the adapters held in memory must be at least 1, got {max_held}")
        self.model, self.max_held = model, max_held
        self.fused = fused_layers(model)
        self.paths: dict[str, Path] = {}  # registered
        self.loaded: OrderedDict[str, AdapterWeights] = OrderedDict()  # least recently used first
        self.users: Counter[str] = Counter()  # rows (running or waiting) per adapter
        self.lock = threading.Lock()
        self.held = HeldAdapters({}, {})

    def register(self, name: str, directory: str | os.PathLike) -> None:
        """Register (or replace) adapter `name`, read from its PEFT directory now: one that does
        not fit this model is refused here, not on its first request."""
        if not name or not isinstance(name, str):
            raise AdapterError(f"an adapter needs a name, got {name!r}")
        if not self.fused:
            raise AdapterError("this model has no layers LoRA adapts (an LSTM?)")
        weights = self._read(directory)
        with self.lock:
            if self.users[name]:
                raise AdapterError(f"adapter {name!r} is in use by running requests; unregister it first")
            self.paths[name] = Path(directory)
            self.loaded.pop(name, None)
            self._hold(name, weights)

    def unregister(self, name: str) -> None:
        """Forget adapter `name`: new requests cannot use it; rows using it finish with it."""
        with self.lock:
            if self.paths.pop(name, None) is None:
                raise UnknownAdapterError(f"no adapter named {name!r}")
            if not self.users[name]:
                self.loaded.pop(name, None)
                self._rebuild()

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.paths)

    def acquire(self, name: str) -> None:
        """A row will use adapter `name`: load it if it was dropped, and keep it until `release`."""
        with self.lock:
            if name not in self.paths:
                raise UnknownAdapterError(f"no adapter named {name!r}")
            self.users[name] += 1
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return
            path = self.paths[name]
        try:
            weights = self._read(path)  # outside the lock: a file read
            with self.lock:
                if name not in self.loaded:
                    self._hold(name, weights)
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        """A row that used adapter `name` has finished."""
        with self.lock:
            self.users[name] -= 1
            if self.users[name] <= 0:
                del self.users[name]
                if name not in self.paths and self.loaded.pop(name, None) is not None:
                    self._rebuild()  # unregistered while rows used it: dropped now

    def _read(self, directory: str | os.PathLike) -> AdapterWeights:
        _, weights = read_adapter(self.model, directory)
        return weights

    def _hold(self, name: str, weights: AdapterWeights) -> None:
        """Load `weights` as `name` (lock held), dropping the least recently used idle adapter
        when `max_held` are loaded."""
        while len(self.loaded) >= self.max_held:
            idle = next((n for n in self.loaded if not self.users[n]), None)
            if idle is None:
                raise AdaptersBusyError(
                    f"all {self.max_held} adapters held in memory are in use by running requests; "
                    "try again when one finishes"
                )
            del self.loaded[idle]
        self.loaded[name] = weights
        self._rebuild()

    def _rebuild(self) -> None:
        names = list(self.loaded)
        like = self.model.lm_head.weight
        layers = layout(self.fused, [self.loaded[n] for n in names], like.detach())
        self.held = HeldAdapters({n: i for i, n in enumerate(names, start=1)}, layers)
