"""Between the routes and the backends: settings in, choice deltas and results out.

A `Generation` is one request's n choices as any backend produces them: `ChoiceDelta`s as
they come (`deltas()`), the whole `Result` at the end. The routes only render these as
OpenAI JSON or SSE chunks. `Job` is the local engine's generation: it submits one engine
sequence per choice (n choices of each prompt), merges their events and turns tokens into
text (stop strings cut, unfinished UTF-8 held back). A job that is abandoned (client gone,
error) cancels its sequences, which frees their slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from semilla import __version__
from semilla.api import StopStringFilter
from semilla.config import GenerateConfig
from semilla.errors import SemillaError
from semilla.models.adapter_bank import AdaptersBusyError, UnknownAdapterError
from semilla.serve import metrics
from semilla.serve.engine import (
    Engine,
    LogitsRule,
    ModelUnloadedError,
    QueueFullError,
    QueueTimeoutError,
    Sequence,
)
from semilla.serve.errors import APIError
from semilla.serve.hooks import CompletionRecord
from semilla.serve.registry import ServedModel
from semilla.serve.structured import OutputFormat

FINGERPRINT = f"semilla-{__version__}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class TokenInfo:
    """One token as OpenAI's logprobs show it (a prompt's first token has no logprob: None)."""

    text: str
    logprob: float | None
    top: list[tuple[str, float]]

    def openai(self) -> dict[str, Any]:
        return {
            "token": self.text,
            "logprob": self.logprob,
            "bytes": list(self.text.encode("utf-8")),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in self.top
            ],
        }


@dataclass
class ChoiceDelta:
    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)  # the tokens whose text `text` completes
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    n_tokens: int = 0
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason 'stop')
    held: str = ""  # text kept back until the content filter can judge a whole word
    pending: list[TokenInfo] = field(default_factory=list)  # logprobs of tokens whose text is held back


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int  # of all prompts together (once per prompt, as OpenAI counts)
    elapsed_s: float = 0.0
    complete: bool = True  # every choice ended normally (not failed, filtered or cut short)
    prompt_logprobs: list[list[TokenInfo]] = field(default_factory=list)  # per prompt, when scored (echo)

    @property
    def completion_tokens(self) -> int:
        return sum(c.n_tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def record(self, id: str, model: str, route: str, prompt: Any, **extra: Any) -> CompletionRecord:
        """This result as the accounts layer stores it (conversation_id=..., extra=...)."""
        return CompletionRecord(
            id=id,
            model=model,
            route=route,
            prompt=prompt,
            outputs=[c.text for c in self.choices],
            finish_reasons=[c.finish_reason or "stop" for c in self.choices],
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_ms=1000 * self.elapsed_s,
            **extra,
        )

    def size(self) -> int:
        """Approximate bytes, for the response cache's budget."""
        scored = sum(len(p) for p in self.prompt_logprobs)
        return 200 + 64 * scored + sum(len(c.text.encode()) + 64 * len(c.tokens) for c in self.choices)


def sampling_config(req: Any, max_new_tokens: int, logprobs: int | None = None) -> GenerateConfig:
    """GenerateConfig from a validated request's sampling fields."""
    return GenerateConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(getattr(req, "min_tokens", 0), max_new_tokens),
        temperature=req.temperature,
        top_k=getattr(req, "top_k", 0),
        top_p=req.top_p,
        min_p=getattr(req, "min_p", 0.0),
        repetition_penalty=getattr(req, "repetition_penalty", 1.0),
        frequency_penalty=getattr(req, "frequency_penalty", 0.0),
        presence_penalty=getattr(req, "presence_penalty", 0.0),
        seed=req.seed,
        logprobs=logprobs,
        truncate="error",
    )


def settings_or_400(cfg: GenerateConfig) -> GenerateConfig:
    """`cfg`, validated; a 400 naming every bad value otherwise."""
    try:
        return cfg.validate()
    except SemillaError as e:
        raise APIError(400, str(e), code="invalid_value") from e


@dataclass
class GenerationCall:
    """What a route asks of a backend, whatever answers: the request's settings, checked."""

    cfg: GenerateConfig  # max_new_tokens: what the client asked for, or the server's default
    asked: bool = True  # False: a default that a short context may cut instead of refusing
    n: int = 1
    stream: bool = False  # a fallback chain commits to a backend at its first delta
    param: str = "max_tokens"  # the request's names for error messages
    prompt_param: str = "messages"
    screen: Callable[[str], bool] | None = None  # True: withhold the output (content filter)
    on_tokens: Callable[[int], None] | None = None  # told the tokens generated, however it ends
    user_key: str = ""  # who asks (the request's user, else its account, key or address): A/B stickiness
    score_prompt: bool = False  # also the log-probability of each prompt token (completions' echo)
    output: OutputFormat | None = None  # the answer must be JSON of this schema (constrained decoding)
    logit_bias: dict[str, float] | None = None  # OpenAI's {"token id": bias}, checked by the schema


def fit_max_tokens(model: str, limit: int | None, prompt_len: int, call: GenerationCall) -> int:
    """How many tokens to generate within a context of `limit` tokens (None: unbounded); a
    prompt that does not fit, or an asked max_tokens that does not, is a 400."""
    asked = call.cfg.max_new_tokens
    if limit is None:
        return asked
    if prompt_len > limit or (prompt_len == limit and asked > 0):  # a whole context may be scored
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; model {model!r} has a context of {limit} tokens",
            param=call.prompt_param,
            code="context_length_exceeded",
        )
    room = limit - prompt_len
    if call.asked and asked > room:
        raise APIError(
            400,
            f"{call.param}={asked} does not fit: the prompt has {prompt_len} tokens and model {model!r} "
            f"has a context of {limit} tokens ({room} left)",
            param=call.param,
            code="context_length_exceeded",
        )
    return min(asked, room)


class Generation(ABC):
    """The n choices of one request from some backend: `start()`, then `deltas()` as they
    come (each choice ends with a finish_reason) or `result()` at once."""

    model: str  # the id that answers: reported as the response's `model` and recorded
    fingerprint: str = FINGERPRINT  # the response's system_fingerprint
    cacheable: bool = False  # a deterministic answer may be replayed from the response cache
    model_version: str | None = None  # an A/B route's variant that answered (the response says so)

    def __init__(self, model: str, n_choices: int, call: GenerationCall):
        self.model, self.call, self.cfg = model, call, call.cfg
        self.screen, self.on_tokens = call.screen, call.on_tokens
        self.choices = [Choice(i) for i in range(n_choices)]
        self.headers: dict[str, str] = {}  # added to the HTTP response (which provider answered)
        self.texts: list = []  # the prompt as the request gave it: messages, or the prompt texts
        self.prompt_logprobs: list[list[TokenInfo]] = []  # per prompt, when the call scores them
        self.prompt_tokens = 0
        self.failed = False
        self.started = time.perf_counter()

    async def start(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Begin generating; refusals (busy, bad settings, no provider) raise APIError here."""

    @abstractmethod
    def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Each choice's text deltas as they come, the last of each with its finish_reason."""

    def cancel(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Stop generating (the client left): free whatever the generation holds."""

    def _screen(self, choice: Choice, delta: ChoiceDelta) -> bool:
        """Pass the delta through the content filter; True when the choice is withheld.

        Text is shown only up to the last word boundary until the choice finishes, and judged
        before it is shown: a blocked word never appears, and is never found inside a longer
        word still being written ('ass' in 'assume')."""
        candidate = choice.held + delta.text
        cut = len(candidate)
        if not choice.finish_reason:
            while cut and (candidate[cut - 1].isalnum() or candidate[cut - 1] == "_"):
                cut -= 1
        shown, choice.held = candidate[:cut], candidate[cut:]
        if shown and self.screen(choice.text + shown):
            delta.text, choice.held, choice.finish_reason = "", "", "content_filter"
            return True
        delta.text = shown
        return False

    async def result(self) -> Result:
        async for _ in self.deltas():
            pass
        return self.finish()

    def finish(self) -> Result:
        result = Result(self.choices, self.prompt_tokens, time.perf_counter() - self.started)
        result.prompt_logprobs = self.prompt_logprobs
        result.complete = not self.failed and all(c.finish_reason in ("stop", "length") for c in self.choices)
        return result


class Job(Generation):
    """The n choices of one or more prompts, running in the local engine."""

    cacheable = True

    def __init__(
        self,
        engine: Engine,
        served: ServedModel,
        prompts: list[list[int]],
        cfg: GenerateConfig,
        call: GenerationCall,
        adapter: str | None = None,
        rules: Callable[[], tuple[LogitsRule, ...]] = tuple,
    ):
        """`cfg`: the call's settings fitted to the model (max_new_tokens, stop strings);
        `adapter`: a LoRA adapter of the model, which then answers under the adapter's name;
        `rules()`: each sequence's own logits rules (a grammar's parser state, a bias)."""
        super().__init__(adapter or served.id, len(prompts) * call.n, call)
        self.engine, self.served, self.cfg, self.n = engine, served, cfg, call.n
        self.adapter = adapter
        self.prompts, self.rules = prompts, rules
        self.prompt_tokens = sum(len(p) for p in prompts)
        tok = served.lm.tokenizer
        self.tokenizer = tok
        self.stop_ids = frozenset(served.lm.stop_ids) | frozenset(cfg.stop_token_ids)
        self.text_filters = [StopStringFilter(tok, cfg.stop) for _ in self.choices]
        self.piece_filters = [StopStringFilter(tok, []) for _ in self.choices]
        self.sequences: dict[Sequence, int] = {}
        self.queue: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        if self.call.score_prompt:  # one forward pass per prompt, off the event loop
            self.prompt_logprobs = await asyncio.to_thread(self.score_prompts)
        if self.cfg.max_new_tokens > 0:
            self.submit()

    def score_prompts(self) -> list[list[TokenInfo]]:
        """Each prompt's tokens with their log-probabilities (None for the first) and the
        cfg.logprobs likeliest alternatives, as the generated tokens show them."""
        top = self.cfg.logprobs or 0
        out = []
        for prompt in self.prompts:
            pieces = StopStringFilter(self.tokenizer, [])
            infos = []
            for token, scored in zip(prompt, self.served.lm.prompt_logprobs(prompt, top), strict=True):
                alts = [(self.tokenizer.decode([i]), lp) for i, lp in scored[1]] if scored else []
                infos.append(TokenInfo(pieces.push(token), scored[0] if scored else None, alts))
            out.append(infos)
        return out

    def submit(self) -> None:
        """Queue every choice; all or nothing (503 with Retry-After when the line is full)."""
        wanted = len(self.prompts) * self.n
        if wanted > self.engine.queue_size:  # would be a 503 forever: no retry can fit it
            raise APIError(
                400,
                f"the request asks for {wanted} sequences (prompts x n); this server queues at most "
                f"{self.engine.queue_size} at once",
                param="n" if self.n > 1 else "prompt",
            )
        loop = asyncio.get_running_loop()
        try:
            for p_index, prompt in enumerate(self.prompts):
                for j in range(self.n):
                    seed = None if self.cfg.seed is None else self.cfg.seed + j
                    cfg = dataclasses.replace(self.cfg, seed=seed)
                    seq = self.engine.submit(
                        self.served.id,
                        prompt,
                        cfg,
                        self.stop_ids,
                        loop,
                        self.queue,
                        adapter=self.adapter,
                        rules=self.rules(),
                    )
                    self.sequences[seq] = p_index * self.n + j
        except QueueFullError as e:
            self.cancel()
            raise APIError(
                503, f"the server is busy ({e}); retry shortly", headers={"Retry-After": "1"}
            ) from e
        except (ModelUnloadedError, UnknownAdapterError) as e:  # unloaded since the route resolved it
            self.cancel()
            raise APIError(404, str(e), param="model", code="model_not_found") from e
        except AdaptersBusyError as e:
            self.cancel()
            raise APIError(429, f"{e}", code="adapters_busy", headers={"Retry-After": "1"}) from e
        metrics.PROMPT_TOKENS.labels(self.served.id).inc(sum(len(p) for p in self.prompts))

    def cancel(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        for seq in self.sequences:
            seq.cancel()

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Text deltas of every choice as tokens arrive; each choice ends with a finish_reason."""
        if not self.sequences:  # max_tokens 0: the prompts were only scored
            for choice in self.choices:
                choice.finish_reason = "length"
                yield ChoiceDelta(choice.index, "", [], "length")
            return
        remaining = len(self.choices)
        try:
            while remaining:
                seq, event = await self.queue.get()
                if isinstance(event, BaseException):
                    self.failed = True
                    if isinstance(event, QueueTimeoutError):
                        raise APIError(503, f"the server is busy: {event}", headers={"Retry-After": "1"})
                    raise APIError(500, "generation failed", type="server_error")
                index = self.sequences[seq]
                choice = self.choices[index]
                if choice.finish_reason:  # already ended by a stop string
                    continue
                delta = self._push(index, event.token, event.logprob, event.top_logprobs)
                if self.text_filters[index].stopped:
                    choice.finish_reason = "stop"
                    choice.stop_sequence = self.text_filters[index].matched
                    seq.cancel()  # free the slot now
                elif event.finish_reason:
                    delta.text += self.text_filters[index].flush()
                    choice.finish_reason = event.finish_reason
                if self.screen is not None and self._screen(choice, delta):
                    seq.cancel()
                delta.finish_reason = choice.finish_reason
                choice.text += delta.text
                delta.tokens = self._release(choice)
                if delta.finish_reason:
                    remaining -= 1
                yield delta
        finally:
            self.cancel()
            generated = sum(c.n_tokens for c in self.choices)
            metrics.COMPLETION_TOKENS.labels(self.served.id).inc(generated)
            if self.on_tokens is not None:
                self.on_tokens(generated)

    def _push(
        self, index: int, token: int | None, logprob: float, top: list[tuple[int, float]]
    ) -> ChoiceDelta:
        if token is None:
            return ChoiceDelta(index, "")
        choice = self.choices[index]
        choice.n_tokens += 1
        text = self.text_filters[index].push(token)
        if self.cfg.logprobs is not None:
            piece = self.piece_filters[index].push(token)
            alts = [(self.tokenizer.decode([i]), lp) for i, lp in top]
            choice.pending.append(TokenInfo(piece, logprob, alts))
        return ChoiceDelta(index, text)

    @staticmethod
    def _release(choice: Choice) -> list[TokenInfo]:
        """The held tokens whose text the choice now shows in full. Text cut by a stop string
        (or withheld by the content filter) is never shown, so its tokens never appear: the
        logprobs always spell a prefix of the content."""
        shown = sum(len(t.text) for t in choice.tokens)
        released = []
        while choice.pending and shown + len(choice.pending[0].text) <= len(choice.text):
            shown += len(choice.pending[0].text)
            released.append(choice.pending.pop(0))
        choice.tokens.extend(released)
        return released


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def run_to_end(request, job: Generation, poll_s: float = 0.25) -> Result:
    """job.result(); if the client disconnects first, its slots are freed and ClientGone raised."""
    task = asyncio.ensure_future(job.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
        job.cancel()
