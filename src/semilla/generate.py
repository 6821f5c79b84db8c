"""The generation core: token ids in, token ids out, one step at a time. No text, no HTTP.

`stream()` runs a batch of prompts with the KV cache and yields, per step, the new token of
every row still running; `generate()` collects those; `beam_search()` returns best sequences.
The sampling filters are plain functions on (B, V) logits so the server's engine reuses them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from semilla.config import GenerateConfig
from semilla.errors import SemillaError

log = logging.getLogger(__name__)


class ContextLengthError(SemillaError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


# --- sampling filters on (B, V) logits; per-row settings are (B, 1) tensors ---------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: logit -= count * frequency + (count > 0) * presence."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def filter_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k highest logits (k = 0: keep all). Ties at the k-th value are kept."""
    V = logits.size(-1)
    k = torch.where(k <= 0, V, k.clamp(max=V))  # (B, 1)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def filter_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose total probability >= p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly before each token
    # the first token is always kept (before = 0 < p); rows with p = 1 keep every token even
    # where float rounding lets the running sum reach 1 before the tail
    drop_sorted = (before >= p) & (p < 1)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, -math.inf)


@dataclass
class SamplingParams:
    """Per-row sampling settings as (B, 1) tensors, built from one GenerateConfig per row, and
    which steps any row needs at all (plain bools: no tensor reduction per decode step)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    sampled_rows: list[int]  # rows with temperature > 0
    any_repetition: bool
    any_frequency_presence: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def from_configs(cls, cfgs: Sequence[GenerateConfig], device) -> SamplingParams:
        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

        sampled = [c for c in cfgs if c.temperature > 0]  # filters only matter to sampled rows
        return cls(
            temperature=col([c.temperature for c in cfgs]),
            top_k=col([c.top_k for c in cfgs], torch.long),
            top_p=col([c.top_p for c in cfgs]),
            min_p=col([c.min_p for c in cfgs]),
            repetition=col([c.repetition_penalty for c in cfgs]),
            frequency=col([c.frequency_penalty for c in cfgs]),
            presence=col([c.presence_penalty for c in cfgs]),
            sampled_rows=[b for b, c in enumerate(cfgs) if c.temperature > 0],
            any_repetition=any(c.repetition_penalty != 1 for c in cfgs),
            any_frequency_presence=any(c.frequency_penalty != 0 or c.presence_penalty != 0 for c in cfgs),
            any_top_k=any(c.top_k > 0 for c in sampled),
            any_top_p=any(c.top_p < 1 for c in sampled),
            any_min_p=any(c.min_p > 0 for c in sampled),
        )


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Penalties, then temperature and the top-k / top-p / min-p filters. Greedy rows untouched
    by temperature (they take the argmax of the penalized logits; no filter changes it)."""
    if params.any_repetition:
        logits = apply_repetition_penalty(logits, seen, params.repetition)
    if params.any_frequency_presence:
        logits = apply_frequency_presence(logits, counts, params.frequency, params.presence)
    if not params.sampled_rows:
        return logits
    greedy = params.temperature == 0
    logits = logits / torch.where(greedy, 1.0, params.temperature)
    if params.any_top_k:
        logits = filter_top_k(logits, params.top_k)
    if params.any_top_p:
        logits = filter_top_p(logits, params.top_p)
    if params.any_min_p:
        logits = filter_min_p(logits, params.min_p)
    return logits


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token per row: argmax for temperature 0, else a draw with the row's own generator
    (rows without a seed draw together from the global one: one call for a busy server)."""
    tokens = logits.argmax(-1)
    if params.sampled_rows:
        probs = logits.float().softmax(-1)
        unseeded = [b for b in params.sampled_rows if generators[b] is None]
        if unseeded:
            rows = torch.tensor(unseeded, device=logits.device)
            tokens[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
        for b in params.sampled_rows:
            if generators[b] is not None:
                tokens[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    return tokens


def hold_stop_tokens(logits: torch.Tensor, held: Iterable[tuple[int, Iterable[int]]]) -> None:
    """No stop before min_new_tokens: -inf on the stop tokens of each (row, stop ids), in one
    indexed write for every such row."""
    pairs = [(row, token) for row, stops in held for token in stops]
    if pairs:
        rows, tokens = zip(*pairs, strict=True)
        logits[list(rows), list(tokens)] = -math.inf


def top_alternatives(top, row: int, n: int) -> list[tuple[int, float]]:
    """The n most likely (token, log-probability) of a row, from a topk() result."""
    return list(zip(top.indices[row, :n].tolist(), top.values[row, :n].tolist(), strict=True))


def mark_seen(seen: torch.Tensor, counts: torch.Tensor, emitted: list[tuple[int, int]]) -> None:
    """Record each (row, token) just emitted for the penalties, in one indexed update."""
    if emitted:
        rows, toks = (torch.tensor(x, device=seen.device) for x in zip(*emitted, strict=True))
        seen[rows, toks] = True
        counts[rows, toks] += 1


# --- the generation loop ------------------------------------------------------------------


@dataclass
class TokenEvent:
    """One step of one row: the new token (None when the row stopped on a stop token)."""

    row: int
    token: int | None
    logprob: float = 0.0
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # 'stop' | 'length' once the row is done


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    prompt_tokens: int

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-probability) of the generated tokens under the model."""
        if not self.logprobs:
            return float("nan")
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


def context_limit(model: nn.Module) -> int | None:
    """The most positions a model can attend to (None for the LSTM, which has no limit)."""
    return None if model.config.arch == "lstm" else model.config.block_size


def fit_prompt(prompt: list[int], cfg: GenerateConfig, limit: int | None, bos_id: int) -> list[int]:
    """Start from <bos> when empty; a prompt that leaves no room in the context is cut from
    the left (with a warning) or refused, as cfg.truncate says. Generation itself stops at
    the end of the context with finish_reason 'length'."""
    prompt = list(prompt) or [bos_id]
    if limit is None or len(prompt) < limit:
        return prompt
    if cfg.truncate == "error":
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens; the model's context is {limit} tokens"
        )
    keep = max(1, limit - min(cfg.max_new_tokens, limit // 2))  # leave room to generate
    log.warning(
        "prompt of %d tokens truncated from the left to %d to fit the context of %d",
        len(prompt),
        keep,
        limit,
    )
    return prompt[-keep:]


def prefill(model: nn.Module, prompts: list[list[int]], pad_id: int, use_cache: bool, cache, adapters=None):
    """Run the prompts; returns the logits at each row's last prompt token, (B, V). `adapters`:
    each row's LoRA adapter (models/adapter_bank.RowAdapters), with the cache only."""
    device = model.lm_head.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if model.config.arch == "lstm" and use_cache:  # states must not see padding: one row at a time
        rows, states = [], []
        for p in prompts:
            row_cache = model.new_cache(1)
            rows.append(model(torch.tensor([p], device=device), cache=row_cache)[:, -1])
            states.append(row_cache.hc)
        cache.hc = tuple(torch.cat([s[i] for s in states], dim=1) for i in range(2))
        return torch.cat(rows)
    T = int(lengths.max())
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)  # right padding
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(T, device=device).expand(len(prompts), T)
    if adapters is not None:
        logits = model(idx, positions, cache, adapters)
    else:
        logits = model(idx, positions, cache) if use_cache else model(idx)
    return logits[torch.arange(len(prompts), device=device), lengths - 1]


@torch.no_grad()
def stream(
    model: nn.Module,
    prompts: list[list[int]],
    cfgs: GenerateConfig | Sequence[GenerateConfig],
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    bos_id: int = 2,
    stop_rows: set[int] | None = None,
) -> Iterator[list[TokenEvent]]:
    """Generate for a batch of prompts; yields the events of every step until all rows finish.

    Row b samples with its own generator seeded by cfgs[b].seed, so a row's output does not
    depend on the other rows of the batch. `stop_ids` (eos, end of turn) end a row; they
    and cfg.stop_token_ids are never emitted. A caller may add row numbers to `stop_rows`
    between steps (a stop string matched, a client left): those rows end there.
    """
    stop_rows = stop_rows if stop_rows is not None else set()
    if isinstance(cfgs, GenerateConfig):
        cfgs = [cfgs] * len(prompts)
    assert len(cfgs) == len(prompts) and prompts, "one config per prompt, at least one prompt"
    for c in cfgs:
        c.validate()
    model.eval()
    device = model.lm_head.weight.device
    limit = context_limit(model)
    prompts = [fit_prompt(p, c, limit, bos_id) for p, c in zip(prompts, cfgs, strict=True)]
    B, V = len(prompts), model.config.vocab_size
    params = SamplingParams.from_configs(cfgs, device)
    generators = [
        torch.Generator(device=device).manual_seed(c.seed) if c.seed is not None else None for c in cfgs
    ]
    row_stops = [set(c.stop_token_ids) | (set() if c.ignore_eos else set(stop_ids)) for c in cfgs]
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen[b, torch.tensor(p, device=device)] = True
    counts = torch.zeros(B, V, device=device)
    use_cache = all(c.use_cache for c in cfgs)
    max_len = max(len(p) + c.max_new_tokens for p, c in zip(prompts, cfgs, strict=True))
    cache = model.new_cache(B, min(max_len, limit) if limit else None) if use_cache else None
    sequences = [list(p) for p in prompts]
    produced = [0] * B
    running = [True] * B
    want_logprobs = max((c.logprobs or 0) for c in cfgs)
    logits = prefill(model, prompts, pad_id, use_cache, cache).float()
    while any(running):
        # 1. choose this step's tokens (stop tokens are masked until min_new_tokens; the
        #    reported log-probabilities are the model's own, before any masking)
        logprobs = logits.log_softmax(-1)
        hold_stop_tokens(
            logits, ((b, row_stops[b]) for b in range(B) if produced[b] < cfgs[b].min_new_tokens)
        )
        tokens = choose_tokens(process_logits(logits, params, seen, counts), params, generators)
        chosen_logprobs = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        top = logprobs.topk(want_logprobs, dim=-1) if want_logprobs else None
        # 2. emit events, update per-row state
        events, emitted = [], []
        for b, tok in enumerate(tokens.tolist()):
            if not running[b]:
                continue
            if tok in row_stops[b]:
                running[b] = False
                events.append(TokenEvent(b, None, finish_reason="stop"))
                continue
            produced[b] += 1
            sequences[b].append(tok)
            emitted.append((b, tok))
            n_top = cfgs[b].logprobs or 0
            alts = top_alternatives(top, b, n_top) if n_top else []
            done = produced[b] >= cfgs[b].max_new_tokens or (limit is not None and len(sequences[b]) >= limit)
            if done:
                running[b] = False
            events.append(TokenEvent(b, tok, chosen_logprobs[b], alts, "length" if done else None))
        if params.any_repetition or params.any_frequency_presence:
            mark_seen(seen, counts, emitted)
        yield events
        for b in stop_rows:
            running[b] = False
        if not any(running):
            break
        # 3. one decode step for every row (finished rows ride along; their output is ignored)
        last = torch.tensor([[s[-1]] for s in sequences], device=device)
        if use_cache:
            positions = torch.tensor([[len(s) - 1] for s in sequences], device=device)
            logits = model(last, positions, cache)[:, -1].float()
        else:
            logits = prefill(model, sequences, pad_id, False, None).float()


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    cfgs: GenerateConfig | Sequence[GenerateConfig],
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    bos_id: int = 2,
) -> list[Generation]:
    """Run `stream` to the end and collect one Generation per prompt."""
    if isinstance(cfgs, GenerateConfig):
        cfgs = [cfgs] * len(prompts)
    limit = context_limit(model)
    prompts = [fit_prompt(p, c, limit, bos_id) for p, c in zip(prompts, cfgs, strict=True)]
    out = [Generation([], [], [], "length", len(p)) for p in prompts]
    for events in stream(model, prompts, cfgs, stop_ids, pad_id, bos_id):
        for e in events:
            g = out[e.row]
            if e.token is not None:
                g.tokens.append(e.token)
                g.logprobs.append(e.logprob)
                g.top_logprobs.append(e.top_logprobs)
            if e.finish_reason:
                g.finish_reason = e.finish_reason
    return out


@torch.no_grad()
def beam_search(
    model: nn.Module,
    prompt: list[int],
    cfg: GenerateConfig,
    stop_ids: Sequence[int] = (),
    bos_id: int = 2,
) -> list[tuple[list[int], float]]:
    """Beam search with length penalty: the best `num_beams` (tokens, score), best first.

    score = sum of log-probabilities / length ** length_penalty (Hugging Face's convention).
    """
    cfg.validate()
    model.eval()
    device = model.lm_head.weight.device
    limit = context_limit(model)
    prompt = fit_prompt(prompt, cfg, limit, bos_id)
    K, stops = cfg.num_beams, set(stop_ids) | set(cfg.stop_token_ids)
    cache = model.new_cache(1, min(len(prompt) + cfg.max_new_tokens, limit or 1 << 30))
    logits = prefill(model, [prompt], 0, True, cache)  # (1, V)
    max_new = cfg.max_new_tokens if limit is None else min(cfg.max_new_tokens, limit - len(prompt))
    _expand_cache(cache, torch.zeros(K, dtype=torch.long, device=device))
    beams: list[list[int]] = [[] for _ in range(K)]
    scores = torch.full((K,), -math.inf, device=device)
    scores[0] = 0.0  # all beams start identical: only the first may expand at step one
    logits = logits.expand(K, -1)
    finished: list[tuple[list[int], float]] = []

    def normalized(tokens: list[int], total: float) -> float:
        return total / max(1, len(tokens)) ** cfg.length_penalty

    for step in range(max_new):
        logprobs = logits.float().log_softmax(-1) + scores[:, None]  # (K, V)
        top_scores, flat = logprobs.view(-1).topk(2 * K)
        V = logprobs.size(-1)
        next_beams, next_scores, origin = [], [], []
        for s, f in zip(top_scores.tolist(), flat.tolist(), strict=True):
            beam, tok = divmod(f, V)
            if s == -math.inf:
                break
            if tok in stops or step == max_new - 1:
                seq = beams[beam] + ([] if tok in stops else [tok])
                finished.append((seq, normalized(seq, s)))
            else:
                next_beams.append(beams[beam] + [tok])
                next_scores.append(s)
                origin.append(beam)
            if len(next_beams) == K:
                break
        best_alive = max(
            (normalized(b, s) for b, s in zip(next_beams, next_scores, strict=True)),
            default=-math.inf,
        )
        finished.sort(key=lambda x: -x[1])
        if not next_beams or (len(finished) >= K and finished[K - 1][1] >= best_alive):
            break
        while len(next_beams) < K:  # keep K rows; padding beams can never win
            next_beams.append(list(next_beams[0]))
            next_scores.append(-math.inf)
            origin.append(origin[0])
        _expand_cache(cache, torch.tensor(origin, device=device))
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        pos = len(prompt) + len(beams[0]) - 1
        last = torch.tensor([[b[-1]] for b in beams], device=device)
        logits = model(last, torch.tensor([pos], device=device), cache)[:, -1]
    finished.sort(key=lambda x: -x[1])
    return finished[:K]


def _expand_cache(cache, origin: torch.Tensor) -> None:
    """Reorder (or broadcast) the cache rows: row i continues from row origin[i]."""
    if hasattr(cache, "k"):
        cache.k = [
            k.index_select(0, origin) if k.size(0) > 1 else k.expand(len(origin), -1, -1, -1).contiguous()
            for k in cache.k
        ]
        cache.v = [
            v.index_select(0, origin) if v.size(0) > 1 else v.expand(len(origin), -1, -1, -1).contiguous()
            for v in cache.v
        ]
    elif cache.hc is not None:
        cache.hc = tuple(
            s.index_select(1, origin) if s.size(1) > 1 else s.expand(-1, len(origin), -1).contiguous()
            for s in cache.hc
        )
