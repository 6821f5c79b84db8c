"""The Python API over the generation core: text in, text out.

import semilla
lm = semilla.load("runs/demo")
lm.generate("En un lugar", max_new_tokens=50, temperature=0.8)
for piece in lm.stream("En un lugar"): print(piece, end="")
lm.chat([{"role": "user", "content": "Hola"}])
lm.score("En un lugar de la Mancha")  # {'log_likelihood', 'perplexity', 'tokens'}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from semilla.checkpoint import load_checkpoint
from semilla.config import GenerateConfig
from semilla.errors import ConfigError, SemillaError
from semilla.generate import Generation, beam_search, context_limit, fit_prompt, stream
from semilla.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    perplexity: float


class StopStringFilter:
    """Turns a growing token list into safe text deltas; cuts at the first stop string.

    Text that could still be the start of a stop string, or an unfinished UTF-8 character,
    is held back until the next token decides it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            return self._take(text[:cut])
        safe = len(text.rstrip("\ufffd"))  # an unfinished multi-byte character decodes as U+FFFD
        for s in self.stop:  # hold back a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(text[:safe])

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        delta = text[self.emitted :] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return delta


class LanguageModel:
    """A loaded checkpoint: generate, stream, chat and score text with one shared core."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: dict[str, Any]):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.stop_ids = [tokenizer.eos_id, tokenizer.end_id]

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def context_length(self) -> int:
        return self.model.config.block_size

    def settings(self, **kwargs: Any) -> GenerateConfig:
        """A validated GenerateConfig from keyword arguments (`stop` may be a string)."""
        names = {f.name for f in dataclasses.fields(GenerateConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown generation settings: {', '.join(unknown)}")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        return GenerateConfig(**{k: v for k, v in kwargs.items() if v is not None}).validate()

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if prompt and self.tokenizer.kind == "char" and all(i == self.tokenizer.unk_id for i in ids):
                raise SemillaError("the prompt has no character this model knows (every one maps to <unk>)")
            return ids
        return list(prompt)

    def complete(
        self,
        prompts: list[str | list[int]],
        cfg: GenerateConfig,
        seeds: list[int | None] | None = None,
    ) -> list[Completion]:
        """Complete several prompts in one batch; stop strings are cut from the text."""
        if not prompts:
            raise ConfigError("nothing to generate: num_samples (or the number of prompts) must be >= 1")
        cfgs = [dataclasses.replace(cfg, seed=s) for s in seeds] if seeds else [cfg] * len(prompts)
        if cfg.num_beams > 1:
            pairs = zip(prompts, cfgs, strict=True)
            return [self._beam_completion(self.encode_prompt(p), c) for p, c in pairs]
        tok, limit = self.tokenizer, context_limit(self.model)
        ids = [fit_prompt(self.encode_prompt(p), cfg, limit, tok.bos_id) for p in prompts]
        filters = [StopStringFilter(tok, cfg.stop) for _ in ids]
        texts = [""] * len(ids)
        results = [Generation([], [], [], "length", 0) for _ in ids]
        stop_rows: set[int] = set()
        for events in stream(self.model, ids, cfgs, self.stop_ids, tok.pad_id, tok.bos_id, stop_rows):
            for e in events:
                g = results[e.row]
                if e.token is not None:
                    g.tokens.append(e.token)
                    g.logprobs.append(e.logprob)
                    g.top_logprobs.append(e.top_logprobs)
                    texts[e.row] += filters[e.row].push(e.token)
                    if filters[e.row].stopped:  # a stop string matched: end this row now
                        stop_rows.add(e.row)
                        g.finish_reason = "stop"
                if e.finish_reason and e.row not in stop_rows:
                    g.finish_reason = e.finish_reason
        limit = context_limit(self.model)
        return [
            Completion(
                text + f.flush(), g.tokens, g.finish_reason, len(p), g.logprobs, g.top_logprobs, g.perplexity
            )
            for text, f, g, p in zip(texts, filters, results, ids, strict=True)
        ]

    def _beam_completion(self, prompt: list[int], cfg: GenerateConfig) -> Completion:
        """The best beam; it ended on a stop token unless it used every token it could."""
        limit = context_limit(self.model)
        fitted = fit_prompt(prompt, cfg, limit, self.tokenizer.bos_id)
        tokens, _ = beam_search(self.model, fitted, cfg, self.stop_ids, self.tokenizer.bos_id)[0]
        room = cfg.max_new_tokens if limit is None else min(cfg.max_new_tokens, limit - len(fitted))
        f = StopStringFilter(self.tokenizer, cfg.stop)
        text = "".join(f.push(t) for t in tokens if not f.stopped) + f.flush()
        reason = "stop" if f.stopped or len(tokens) < room else "length"
        return Completion(text, tokens, reason, len(fitted), [], [], float("nan"))

    def generate(
        self, prompt: str | list[int] = "", num_samples: int = 1, **settings: Any
    ) -> str | list[str]:
        """Text continuing `prompt`; a list when num_samples > 1 (sample i uses seed + i)."""
        cfg = self.settings(**settings)
        seeds = [None if cfg.seed is None else cfg.seed + i for i in range(num_samples)]
        out = [c.text for c in self.complete([prompt] * num_samples, cfg, seeds)]
        return out[0] if num_samples == 1 else out

    def stream(self, prompt: str | list[int] = "", **settings: Any) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        cfg = self.settings(**settings)
        yield from self.stream_ids(self.encode_prompt(prompt), cfg)

    def stream_ids(self, ids: list[int], cfg: GenerateConfig) -> Iterator[str]:
        if cfg.num_beams > 1:  # beam search knows its best sequence only at the end
            yield self._beam_completion(ids, cfg).text
            return
        f = StopStringFilter(self.tokenizer, cfg.stop)
        for events in stream(
            self.model, [ids], cfg, self.stop_ids, self.tokenizer.pad_id, self.tokenizer.bos_id
        ):
            for e in events:
                if e.token is not None:
                    delta = f.push(e.token)
                    if delta:
                        yield delta
            if f.stopped:
                return
        tail = f.flush()
        if tail:
            yield tail

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict[str, str]], **settings: Any) -> str:
        """The assistant's reply to a conversation, formatted with the stored chat template."""
        cfg = self.settings(**settings)
        return self.complete([self.chat_ids(messages)], cfg)[0].text

    @torch.no_grad()
    def prompt_logprobs(
        self, ids: list[int], top: int = 0
    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Each token's log-probability given the tokens before it, with the `top` likeliest
        tokens at that place as (id, logprob); None for the first token, which nothing precedes.
        One forward pass: `ids` must fit the context."""
        if len(ids) > self.context_length and self.model.config.arch != "lstm":
            raise SemillaError(f"{len(ids)} tokens do not fit the context of {self.context_length}")
        if len(ids) < 2:
            return [None] * len(ids)
        tokens = torch.tensor([ids], device=self.device)
        logprobs = self.model(tokens[:, :-1]).float().log_softmax(-1)[0]  # (T-1, V)
        chosen = logprobs.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()
        alts = logprobs.topk(top, dim=-1) if top else None
        out: list = [None]
        for t, lp in enumerate(chosen):
            best = list(zip(alts.indices[t].tolist(), alts.values[t].tolist(), strict=True)) if alts else []
            out.append((lp, best))
        return out

    @torch.no_grad()
    def score(self, text: str) -> dict[str, float]:
        """Log-likelihood and perplexity of `text` under the model (windows of the context)."""
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
        if len(ids) < 2:
            raise SemillaError("cannot score an empty text")
        total, n = 0.0, 0
        window = self.context_length if self.model.config.arch != "lstm" else len(ids)
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]], device=self.device)
            logits = self.model(chunk[:, :-1]).float()
            lp = logits.log_softmax(-1).gather(-1, chunk[:, 1:, None]).squeeze(-1)
            total += float(lp.sum())
            n += lp.numel()
        return {
            "log_likelihood": total,
            "tokens": n,
            "perplexity": math.exp(-total / n),
            "bits_per_char": -total / math.log(2) / max(1, len(text)),
        }


def load(
    path: str, device: str | None = None, dtype: str = "auto", adapter: str | None = None
) -> LanguageModel:
    """Load a checkpoint (or run directory: its best/ checkpoint) for generation.

    device: default cuda when available, else cpu. dtype: auto (bfloat16 on CUDA, float32
    elsewhere), float32 or bfloat16 (half the memory; on a CPU its speed depends on the
    processor: with AMX batches run ~1.9x faster, see bench/README.md). adapter: a PEFT LoRA
    adapter directory for this checkpoint, merged into the weights."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, config = load_checkpoint(path, device=device, dtype=dtype)
    if adapter:
        from semilla.models.lora import load_adapter, merge_and_unload

        load_adapter(model, adapter)
        model = merge_and_unload(model).eval()
    if torch.device(device).type == "cpu":
        from semilla.models import kernels

        kernels.compiled()  # built (once per machine) while loading: timings are generation only
    return LanguageModel(model, tokenizer, config)
