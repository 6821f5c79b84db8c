"""Structured output: what a request asks its answer to be (a JSON value of a schema, a call of a
declared function), checked, then compiled into rules the engine applies to that request's rows.

    fmt = OutputFormat(schema, param="response_format")   # a route: any backend may get it
    grammars = Grammars(tokenizer)                          # a local model: one per tokenizer
    grammar = grammars.compile(fmt)                         # 400 naming `param` when refused
    rule = grammars.rule(grammar)                           # one per sequence: its own parser state

The token masks come from llguidance (a lexer and an Earley parser over the tokenizer's byte
strings, about 20-40 µs a token here), for semilla's character-level and byte-level BPE
tokenizers alike. JSON is written compactly (no free whitespace): a small model constrained to
a schema cannot wander into a run of blank lines.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import jsonschema
import llguidance
import numpy as np
import torch

from semilla.serve.errors import APIError
from semilla.tokenizer import SPECIAL_TOKENS, Tokenizer

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class OutputFormat:
    """An answer that must be one JSON value matching `schema` ({"type": "object"}: any object)."""

    schema: dict
    param: str  # the request field it came from: 400s name it


def check_schema(schema: object, param: str) -> dict:
    """`schema` if it is a valid JSON Schema (draft 2020-12); a 400 naming `param` otherwise."""
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON Schema object", param=param, code="invalid_schema")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise APIError(
            400,
            f"{param} is not a valid JSON Schema{f' (at {where})' if where else ''}: {e.message}",
            param=param,
            code="invalid_schema",
        ) from None
    return schema


class TokenBias:
    """OpenAI's logit_bias: a value in [-100, 100] added to some tokens' logits."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def apply(self, logits: torch.Tensor, stop_ids: frozenset[int]) -> None:
        logits.index_add_(0, self.ids.to(logits.device), self.values.to(logits.device))

    def accept(self, token: int) -> None:
        pass


class GrammarRule:
    """One sequence's parser state: masks every token the grammar cannot take next. Where the
    grammar may end, the sequence's stop tokens are allowed (the model's own end of turn ends it)."""

    def __init__(self, matcher: llguidance.LLMatcher, n_tokens: int, eos_id: int):
        self.matcher, self.n_tokens, self.eos_id = matcher, n_tokens, eos_id

    def apply(self, logits: torch.Tensor, stop_ids: frozenset[int]) -> None:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.zeros(logits.shape[0], dtype=torch.bool)
        allowed[: self.n_tokens] = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.n_tokens])
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
        if allowed[self.eos_id]:
            allowed[stops] = True
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
        if not torch.isfinite(logits).any():  # a dead end (a token the vocabulary lacks): end here
            logits[stops.to(logits.device)] = 0.0

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)  # a refused token leaves it in an error state: only stops


class _Bytes:
    """A character-level tokenizer as llguidance's TokenizerWrapper reads one: each token's bytes
    (its character in UTF-8) and an encoder of text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens = [(tokenizer.id_to_token(i) or "").encode("utf-8") for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")
        return self.tokenizer.encode(text)


def guidance_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer`: byte-level BPE from its tokenizer.json, a character-level
    one from its characters (llguidance knows no decoder that glues characters)."""
    if tokenizer.kind == "char":
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Bytes(tokenizer)), n_vocab=tokenizer.vocab_size
        )
    tokenizer.hf.encode_special_tokens = False  # the stored form, as `Tokenizer.save` writes it
    try:
        text = tokenizer.hf.to_str()
    finally:
        tokenizer.hf.encode_special_tokens = True
    return llguidance.LLTokenizer(text, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id)


class Grammars:
    """Compiles output formats for one model's tokenizer (llguidance's view of it made on first use)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._guidance: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def guidance(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._guidance is None:
                self._guidance = guidance_tokenizer(self.tokenizer)
            return self._guidance

    def compile(self, fmt: OutputFormat) -> str:
        """The grammar of `fmt`; a 400 naming its field when llguidance cannot build one (a
        pattern with look-around, an unknown format, a keyword it does not implement)."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema(fmt.schema, defaults=JSON_STYLE)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.guidance)
        if failed:
            problem = " ".join(messages[0].split())
            raise APIError(
                400,
                f"{fmt.param}: the schema cannot be enforced: {problem}",
                param=fmt.param,
                code="invalid_schema",
            )
        return grammar

    def rule(self, grammar: str) -> GrammarRule:
        """A fresh parser of `grammar` for one sequence."""
        matcher = llguidance.LLMatcher(self.guidance, grammar, log_level=0)
        return GrammarRule(matcher, self.tokenizer.vocab_size, self.tokenizer.eos_id)


def token_bias(bias: dict[str, float] | None, vocab_size: int, param: str = "logit_bias") -> dict[int, float]:
    """OpenAI's logit_bias ({"token id": value}, its size and range checked by the schema) as
    {id: value}; a 400 for a key that is not a token id of this model."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"{param}: {key!r} is not a token id in [0, {vocab_size})", param=param)
        out[int(key)] = float(value)
    return out
