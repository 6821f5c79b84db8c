"""`LocalBackend`: a checkpoint served by the continuous-batching engine of this process."""

from __future__ import annotations

import dataclasses
import threading

from semilla.serve.backends.base import Backend
from semilla.serve.engine import Engine
from semilla.serve.errors import APIError
from semilla.serve.registry import ServedModel
from semilla.serve.serving import GenerationCall, Job, fit_max_tokens, settings_or_400
from semilla.serve.structured import Grammars, TokenBias, token_bias


class LocalBackend(Backend):
    """A served model: its chat template, context and tokenizer stay on this side of the seam."""

    adapter: str | None = None  # the LoRA adapter every request runs with (see backends/adapter.py)

    def __init__(self, served: ServedModel, engine: Engine, prompt_observers: list | None = None):
        super().__init__(served.id)
        self.served, self.engine = served, engine
        self.prompt_observers = prompt_observers if prompt_observers is not None else []  # (model, text)
        self.created = served.created
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self.grammars = Grammars(served.lm.tokenizer)

    def card(self, admin: bool = False) -> dict:
        return self.served.card(admin)

    @property
    def context_length(self) -> int | None:
        lm = self.served.lm
        return None if lm.model.config.arch == "lstm" else lm.context_length

    def fits(self, messages: list[dict]) -> bool:
        limit = self.context_length
        return limit is None or len(self.served.lm.tokenizer.apply_chat_template(messages)) < limit

    def _job(self, prompts: list[list[int]], call: GenerationCall) -> Job:
        """A job whose max_new_tokens fits the context left by the longest prompt."""
        max_new = min(
            fit_max_tokens(self.id, self.context_length, len(p), call) for p in prompts
        )  # a prompt or asked max_tokens that cannot fit is a 400, checked before the settings
        cfg = call.cfg
        cfg = settings_or_400(  # max_tokens 0 (score the prompt only): checked as 1, then 0
            dataclasses.replace(
                cfg, max_new_tokens=max(max_new, 1), min_new_tokens=min(cfg.min_new_tokens, max_new)
            )
        )
        cfg = dataclasses.replace(cfg, max_new_tokens=max_new)
        return Job(self.engine, self.served, prompts, cfg, call, self.adapter, self._rules(call))

    def _rules(self, call: GenerationCall):
        """A maker of each sequence's logits rules: the output grammar (compiled once, checked
        now: a 400 for what cannot be enforced), then the logit bias."""
        bias = token_bias(call.logit_bias, self.served.lm.model.config.vocab_size)
        shared = (TokenBias(bias),) if bias else ()
        if call.output is None:
            return lambda: shared
        grammar = self.grammars.compile(call.output)
        return lambda: (self.grammars.rule(grammar), *shared)

    def chat(self, messages: list[dict], call: GenerationCall) -> Job:
        job = self._job([self.served.lm.tokenizer.apply_chat_template(messages)], call)
        job.texts = messages
        self._observe(
            "\n".join(
                m["content"]
                for m in messages
                if m.get("role") == "user" and isinstance(m.get("content"), str)
            )
        )
        return job

    def complete(self, prompt: list[str] | list[int] | list[list[int]], call: GenerationCall) -> Job:
        tokenizer = self.served.lm.tokenizer
        if prompt and not isinstance(prompt[0], str):
            prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
            vocab = self.served.lm.model.config.vocab_size
            if any(
                not 0 <= t < vocab for p in prompts for t in p
            ):  # checked before decoding: any int reaches here
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=call.prompt_param)
            texts = [tokenizer.decode(p) for p in prompts]
        else:
            texts = list(prompt)
            prompts = [tokenizer.encode(t) or [tokenizer.bos_id] for t in texts]
        job = self._job(prompts, call)
        job.texts = texts
        self._observe("\n".join(texts))
        return job

    def _observe(self, text: str) -> None:
        for observe in self.prompt_observers:  # drift's opt-in prompt sample (alerts/drift.py)
            observe(self.id, text)

    def embedder(self):
        """Mean-pooled final hidden states of this model (made on first use)."""
        from semilla.retrieval.embedders import CheckpointEmbedder

        with self._embedder_lock:
            if self._embedder is None:
                lm = self.served.lm
                self._embedder = CheckpointEmbedder(lm.model, lm.tokenizer, self.id)
            return self._embedder
