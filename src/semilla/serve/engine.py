"""Continuous batching: one scheduler thread owns the models and decodes every sequence together.

The HTTP layer submits a `Sequence` (prompt ids + GenerateConfig) and reads its `TokenEvent`s
from an asyncio queue. Every step, for each model, the scheduler

1. drops the sequences whose client left (cancelled) and ends those past their deadline,
2. admits waiting sequences into free slots and prefills them (one batched forward),
3. runs one decode step for every other active slot (one batched forward with the KV cache),
4. samples one token per slot with the generation core's filters (each sequence its own
   settings and seed) and hands each sequence its token.

Slots are the rows of one preallocated cache. Active sequences always occupy rows 0..n-1:
when one finishes, the last row moves into its place, so a decode step is one contiguous
batch. Sequences join and leave between steps.

A sequence may name one of its model's LoRA adapters (`add_adapter`): rows with different
adapters and rows with none share every forward (models/adapter_bank.py). It may also carry
`LogitsRule`s (a grammar's token mask, a logit bias: serve/structured.py) that change its own
row of the logits before sampling; the other rows never see them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from semilla.config import GenerateConfig
from semilla.generate import (
    SamplingParams,
    TokenEvent,
    choose_tokens,
    context_limit,
    hold_stop_tokens,
    mark_seen,
    prefill,
    process_logits,
    top_alternatives,
)
from semilla.models import kernels
from semilla.models.adapter_bank import AdapterBank
from semilla.serve import metrics

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Every slot is busy and the waiting line is full."""


class ModelUnloadedError(Exception):
    """The model was unloaded while the request was being made."""


class QueueTimeoutError(Exception):
    """A request waited for a free slot longer than its timeout."""


class LogitsRule(Protocol):
    """A per-sequence change to its row of the logits (a grammar's mask, a logit bias)."""

    def apply(self, logits: torch.Tensor, stop_ids: frozenset[int]) -> None:
        """Change this row's (V,) logits in place, after the engine's own holds (min_tokens);
        a rule that leaves no token possible must leave the stop tokens possible."""

    def accept(self, token: int) -> None:
        """The row sampled `token` (never one of its stop tokens)."""


@dataclass(eq=False)
class Sequence:
    """One generation request as the engine sees it."""

    prompt: list[int]
    cfg: GenerateConfig
    stop_ids: frozenset[int]
    timeout_s: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    adapter: str | None = None  # a LoRA adapter of the model, by name; None: the base model
    rules: tuple[LogitsRule, ...] = ()  # applied to this sequence's row only, in order
    # engine-side state
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    produced: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Free the slot at the next step (the client left, or a stop string matched)."""
        self.cancelled.set()


def _put_all(items: list[tuple[Sequence, TokenEvent | BaseException]]) -> None:
    for seq, event in items:
        seq.queue.put_nowait((seq, event))


def deliver_all(items: list[tuple[Sequence, TokenEvent | BaseException]]) -> None:
    """Hand events to their requests: one wake-up per event loop per step, not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for seq, event in items:
        by_loop.setdefault(seq.loop, []).append((seq, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for seq, _ in batch:
                seq.cancel()


class SlotCache:
    """The model's cache for `max_slots` rows, with row views and row moves.

    A KV cache row view shares storage with the full cache, so writes through it land in
    place; the LSTM's (h, c) state is replaced on each call, so views of it are copied back.
    """

    def __init__(self, model: nn.Module, max_slots: int):
        self.lstm = model.config.arch == "lstm"
        self.full = model.new_cache(max_slots)
        if self.lstm:
            cfg, p = model.config, model.lm_head.weight
            shape = (cfg.n_layer, max_slots, cfg.lstm_hidden)
            self.full.hc = tuple(torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(2))

    def view(self, start: int, end: int):
        cache = type(self.full).__new__(type(self.full))
        if self.lstm:
            cache.hc = tuple(s[:, start:end] for s in self.full.hc)
        else:
            cache.k = [k[start:end] for k in self.full.k]
            cache.v = [v[start:end] for v in self.full.v]
            cache.max_len = self.full.max_len
        return cache

    def fresh_view(self, start: int, end: int):
        """A view for rows that start a new sequence (an LSTM starts from a zero state)."""
        cache = self.view(start, end)
        if self.lstm:
            cache.hc = None
        return cache

    def commit(self, cache, start: int, end: int) -> None:
        if self.lstm:
            for full, part in zip(self.full.hc, cache.hc, strict=True):
                full[:, start:end] = part

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src` (its first `length` positions) takes row `dst`'s place."""
        if self.lstm:
            for s in self.full.hc:
                s[:, dst] = s[:, src]
            return
        for k, v in zip(self.full.k, self.full.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class ModelWorker:
    """The slots, waiting line and per-slot sampling state of one model."""

    def __init__(
        self, name: str, model: nn.Module, max_slots: int, queue_size: int, pad_id: int, max_adapters: int = 8
    ):
        self.name, self.model, self.pad_id = name, model.eval(), pad_id
        self.adapters = AdapterBank(self.model, max_adapters)
        self.max_slots, self.queue_size = max_slots, queue_size
        self.limit = context_limit(model)
        self.device = model.lm_head.weight.device
        if self.device.type == "cpu":
            kernels.compiled()  # built (once per machine) at start-up, not on the first request
        V = model.config.vocab_size
        self.cache = SlotCache(model, max_slots)
        self.seen = torch.zeros(max_slots, V, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(max_slots, V, device=self.device)
        self.active: list[Sequence] = []  # row i of the cache
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Lock()  # guards `waiting` (the HTTP threads append to it)
        self.closed = False  # unloaded: takes no new sequence
        self.params: SamplingParams | None = None  # of the active rows; rebuilt when they change
        self.ttft = metrics.TIME_TO_FIRST_TOKEN.labels(name)
        self.itl = metrics.INTER_TOKEN_LATENCY.labels(name)
        self.generated = metrics.GENERATED_TOKENS.labels(name)
        self.active_gauge = metrics.ACTIVE_SLOTS.labels(name)
        self.queue_gauge = metrics.QUEUE_DEPTH.labels(name)

    # --- called from the HTTP side -----------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; its adapter (if any) is held from now until it leaves (UnknownAdapterError
        when there is none of that name)."""
        if seq.adapter is not None:
            self.adapters.acquire(seq.adapter)
        with self.lock:
            if not self.closed and len(self.waiting) < self.queue_size:
                self.waiting.append(seq)
                return
            closed = self.closed
        self._leave(seq)
        if closed:
            raise ModelUnloadedError(f"model {self.name!r} was unloaded")
        raise QueueFullError(f"model {self.name!r}: {self.queue_size} requests already waiting")

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    # --- called from the scheduler thread ----------------------------------------------

    def step(self) -> None:
        """Drop, admit, decode, sample: one token for every active sequence."""
        self._drop_cancelled_and_late()
        n_old = len(self.active)
        admitted = self._admit()
        if self.active:
            parts = []
            if n_old:
                parts.append(self._decode(n_old))
            if admitted:
                parts.append(self._prefill(n_old, admitted))
            self._sample(torch.cat(parts))
        self.active_gauge.set(len(self.active))
        self.queue_gauge.set(len(self.waiting))

    def fail_all(self, error: BaseException) -> None:
        """Something broke inside a forward pass: every sequence ends with the error."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        deliver_all([(seq, error) for seq in self.active + waiting])
        for seq in self.active + waiting:
            self._leave(seq)
        self.active, self.params = [], None

    def _leave(self, seq: Sequence) -> None:
        """`seq` is done with its slot or place in line: its adapter may be dropped."""
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)

    def _drop_cancelled_and_late(self) -> None:
        """Cancelled sequences leave silently; one past its deadline ends with 'length' (or,
        still waiting for a slot, with QueueTimeoutError)."""
        now = time.perf_counter()
        done, late = [], []
        for row, seq in enumerate(self.active):
            if seq.cancelled.is_set():
                done.append(row)
            elif now - seq.submitted_at > seq.timeout_s:
                log.warning("request on %s ran past its %.0f s timeout", self.name, seq.timeout_s)
                late.append((seq, TokenEvent(row, None, finish_reason="length")))
                done.append(row)
        self._remove(done)
        with self.lock:
            waiting, self.waiting = self.waiting, deque()
            for seq in waiting:
                if seq.cancelled.is_set():
                    self._leave(seq)
                elif now - seq.submitted_at > seq.timeout_s:
                    late.append((seq, QueueTimeoutError(f"no free slot within {seq.timeout_s:.0f} s")))
                    self._leave(seq)
                else:
                    self.waiting.append(seq)
        deliver_all(late)

    def _admit(self) -> list[Sequence]:
        admitted = []
        with self.lock:
            while self.waiting and len(self.active) + len(admitted) < self.max_slots:
                admitted.append(self.waiting.popleft())
        if admitted:
            self.params = None
        for seq in admitted:
            row = len(self.active)
            self.active.append(seq)
            seq.tokens = list(seq.prompt)
            if seq.cfg.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.cfg.seed)
            self.seen[row] = False
            self.seen[row, torch.tensor(seq.prompt, device=self.device)] = True
            self.counts[row] = 0
        return admitted

    def _prefill(self, start: int, seqs: list[Sequence]) -> torch.Tensor:
        """Run the new prompts into rows start.. of the cache; logits at their last token."""
        if self.cache.lstm:  # an LSTM state must not see padding: one row at a time
            rows = []
            for i, seq in enumerate(seqs):
                row_cache = self.cache.fresh_view(start + i, start + i + 1)
                rows.append(prefill(self.model, [seq.prompt], self.pad_id, True, row_cache))
                self.cache.commit(row_cache, start + i, start + i + 1)
            return torch.cat(rows).float()
        cache = self.cache.fresh_view(start, start + len(seqs))
        adapters = self.adapters.held.rows([s.adapter for s in seqs], self.device)
        logits = prefill(self.model, [s.prompt for s in seqs], self.pad_id, True, cache, adapters)
        return logits.float()

    def _decode(self, n: int) -> torch.Tensor:
        """One new position for rows 0..n-1: feed each its last token."""
        seqs = self.active[:n]
        last = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[len(s.tokens) - 1] for s in seqs], device=self.device)
        cache = self.cache.view(0, n)
        adapters = self.adapters.held.rows([s.adapter for s in seqs], self.device)
        extra = {"adapters": adapters} if adapters is not None else {}  # the LSTM takes none
        logits = self.model(last, positions, cache, **extra)[:, -1]
        self.cache.commit(cache, 0, n)
        return logits.float()

    def _sample(self, logits: torch.Tensor) -> None:
        active = self.active
        n = len(active)
        logprobs = logits.log_softmax(-1)
        hold_stop_tokens(
            logits, ((row, s.stop_ids) for row, s in enumerate(active) if s.produced < s.cfg.min_new_tokens)
        )
        for row, seq in enumerate(active):  # logprobs stay the model's own: taken before the rules
            for rule in seq.rules:
                rule.apply(logits[row], seq.stop_ids)
        if self.params is None:
            self.params = SamplingParams.from_configs([s.cfg for s in active], self.device)
        filtered = process_logits(logits, self.params, self.seen[:n], self.counts[:n])
        tokens = choose_tokens(filtered, self.params, [s.generator for s in active])
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        want_top = max((s.cfg.logprobs or 0) for s in active)
        top = logprobs.topk(want_top, dim=-1) if want_top else None
        now = time.perf_counter()
        events, emitted, finished = [], [], []
        for row, (seq, tok) in enumerate(zip(active, tokens.tolist(), strict=True)):
            if tok in seq.stop_ids:
                events.append((seq, TokenEvent(row, None, finish_reason="stop")))
                finished.append(row)
                continue
            seq.produced += 1
            seq.tokens.append(tok)
            emitted.append((row, tok))
            for rule in seq.rules:
                rule.accept(tok)
            k = seq.cfg.logprobs or 0
            alts = top_alternatives(top, row, k) if k else []
            full = self.limit is not None and len(seq.tokens) >= self.limit
            done = seq.produced >= seq.cfg.max_new_tokens or full
            events.append((seq, TokenEvent(row, tok, chosen[row], alts, "length" if done else None)))
            if seq.last_token_at is None:
                self.ttft.observe(now - seq.submitted_at)
            else:
                self.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            if done:
                finished.append(row)
        deliver_all(events)
        if self.params.any_repetition or self.params.any_frequency_presence:  # rows without
            mark_seen(self.seen, self.counts, emitted)  # penalties never read seen and counts
        self.generated.inc(len(emitted))
        self._remove(finished)

    def _remove(self, rows: list[int]) -> None:
        """Free these rows; the last active row moves into each hole (rows stay 0..n-1)."""
        if rows:
            self.params = None
        for row in sorted(rows, reverse=True):
            self._leave(self.active[row])
            last = len(self.active) - 1
            if row != last:
                moved = self.active[last]
                self.cache.move(last, row, len(moved.tokens))
                self.seen[row] = self.seen[last]
                self.counts[row] = self.counts[last]
                self.active[row] = moved
            self.active.pop()


class Engine:
    """The scheduler thread and the workers of every served model."""

    def __init__(
        self,
        max_slots: int = 16,
        queue_size: int = 64,
        request_timeout_s: float = 300.0,
        max_adapters: int = 8,
    ):
        self.max_slots, self.queue_size, self.request_timeout_s = max_slots, queue_size, request_timeout_s
        self.max_adapters = max_adapters  # LoRA adapters held in memory per model
        self.workers: dict[str, ModelWorker] = {}
        self.retired: deque[ModelWorker] = deque()  # removed workers whose requests must be failed
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def add_model(self, name: str, model: nn.Module, pad_id: int) -> None:
        self.workers[name] = ModelWorker(
            name, model, self.max_slots, self.queue_size, pad_id, self.max_adapters
        )
        self.wake.set()

    def remove_model(self, name: str) -> None:
        """Stop serving `name`: its sequences end with an error at the scheduler's next turn
        (the scheduler thread owns the worker's rows, so it is the one to fail them)."""
        worker = self.workers.pop(name)
        with worker.lock:
            worker.closed = True
        if self.alive:
            self.retired.append(worker)
            self.wake.set()
        else:
            worker.fail_all(RuntimeError(f"model {name!r} was unloaded"))

    def add_adapter(self, model: str, name: str, directory) -> None:
        """Register LoRA adapter `name` (a PEFT directory, checked now) for `model`'s requests;
        the least recently used idle adapters leave memory past `max_adapters`."""
        self.workers[model].adapters.register(name, directory)

    def remove_adapter(self, model: str, name: str) -> None:
        """Unregister adapter `name`: new requests cannot use it; running ones finish with it."""
        self.workers[model].adapters.unregister(name)

    def adapter_names(self, model: str) -> list[str]:
        return self.workers[model].adapters.names()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="semilla-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        for worker in self.workers.values():
            worker.fail_all(RuntimeError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submit(
        self,
        model: str,
        prompt: list[int],
        cfg: GenerateConfig,
        stop_ids: frozenset[int],
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue,
        adapter: str | None = None,
        rules: tuple[LogitsRule, ...] = (),
    ) -> Sequence:
        """Queue a generation whose (sequence, event) pairs go to `queue`; raises QueueFullError
        when the waiting line is full, ModelUnloadedError when the model is gone,
        UnknownAdapterError for an adapter not registered. Several sequences may share one queue
        (n > 1). `rules` change this sequence's logits only (see LogitsRule)."""
        seq = Sequence(
            prompt, cfg, stop_ids, self.request_timeout_s, loop, queue, adapter=adapter, rules=rules
        )
        worker = self.workers.get(model)
        if worker is None:
            raise ModelUnloadedError(f"model {model!r} was unloaded")
        worker.submit(seq)
        self.wake.set()
        return seq

    @torch.inference_mode()
    def _run(self) -> None:
        while not self.stopping.is_set():
            while self.retired:
                worker = self.retired.popleft()
                worker.fail_all(RuntimeError(f"model {worker.name!r} was unloaded"))
            busy = [w for w in list(self.workers.values()) if w.busy]
            if not busy:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            for worker in busy:  # one step of each model in turn
                try:
                    worker.step()
                except Exception:  # a bug or out of memory: fail its requests, keep serving
                    log.exception("engine step failed on %s", worker.name)
                    worker.fail_all(RuntimeError("generation failed (the server log has the details)"))
