"""The teacher: any OpenAI-compatible chat service (Ollama, llama.cpp's server, vLLM, another
semilla, OpenAI) or Anthropic's Messages API, asked, for one gap, for a reference answer, its key
fact and a few question/answer examples. It is spoken to by the server's provider backends
(serve/backends/remote.py), so both protocols and their errors are handled in one place. Its reply
is data: parsed as JSON strings and stored, never obeyed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from semilla.learn.config import LearnConfig

MAX_TEXT = 2000  # characters of one question or answer; a longer one is not a usable example
MAX_REPLY_TOKENS = 4096  # a lesson of 10 examples fits; Anthropic's API needs a bound

SYSTEM = (
    "You write training data for a small language model. Answer the user's question about the "
    "concept and write {n} varied question/answer pairs that teach the same fact, in {language}. "
    'Reply with one JSON object and nothing else: {{"answer": "...", "key": "a short phrase of '
    'the answer that states the fact", "examples": [{{"question": "...", "answer": "..."}}]}}'
)
LANGUAGES = {"es": "Spanish", "en": "English"}


class TeacherUnreachable(Exception):
    """The teacher could not be reached (connection, timeout, 5xx): the round is retried later."""


class TeacherInvalid(Exception):
    """The teacher answered, but not with usable data (empty, HTML, invalid JSON, wrong shape)."""


@dataclass
class Lesson:
    """What the teacher said about one question: the reference answer, its key and examples."""

    answer: str
    key: str
    examples: list[dict[str, str]]


class Teacher:
    """One endpoint and model in its protocol (cfg.teacher_api: openai | anthropic); the API key
    is read from an environment variable."""

    def __init__(self, cfg: LearnConfig):
        from semilla.serve.providers import ProviderConfig, Secret

        logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
        self.cfg = cfg
        key = os.environ.get(cfg.teacher_api_key_env)
        self.provider = ProviderConfig(
            name="teacher",
            kind=cfg.teacher_api,
            base_url=cfg.teacher_url,
            api_key=Secret(key) if key else None,
            timeout_s=cfg.teacher_timeout,
            connect_timeout_s=min(cfg.teacher_timeout, 10.0),
            max_connections=1,
        )

    def teach(self, concept: str, question: str, language: str) -> Lesson:
        """The teacher's lesson for one gap question; raises TeacherUnreachable or TeacherInvalid."""
        from semilla.serve.backends.remote import ProviderError

        system = SYSTEM.format(n=self.cfg.examples_per_gap, language=LANGUAGES[language])
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Concept: {concept}\nQuestion: {question}"},
        ]
        try:
            content = run_to_end(self._reply(messages))
        except ProviderError as e:  # connection, timeout, 5xx, 429: later; a refusal or junk: now
            if e.retryable and e.reason != "invalid":
                raise TeacherUnreachable(f"{self.cfg.teacher_url}: {e.message}") from None
            raise TeacherInvalid(f"the teacher's reply is not usable: {e.message}") from None
        return parse_lesson(content, self.cfg.examples_per_gap)

    async def _reply(self, messages: list[dict[str, str]]) -> str:
        """The text of the teacher's answer, over a connection opened and closed for it."""
        from semilla.config import GenerateConfig
        from semilla.serve.backends.remote import BACKENDS, Upstream
        from semilla.serve.serving import GenerationCall

        upstream = Upstream(self.provider)
        backend = BACKENDS[self.provider.kind](upstream, self.cfg.teacher_model)
        call = GenerationCall(GenerateConfig(max_new_tokens=MAX_REPLY_TOKENS, temperature=0.7))
        try:
            generation = backend.chat(messages, call)
            await generation.start()
            result = await generation.result()
        finally:
            await upstream.aclose()
        return result.choices[0].text

    def provenance(self, concept: str) -> dict[str, Any]:
        return {
            "teacher": self.cfg.teacher_url,
            "model": self.cfg.teacher_model,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "concept": concept,
        }


def run_to_end(coroutine: Coroutine[Any, Any, str]) -> str:
    """Run `coroutine` to its result, also from a thread whose event loop runs (a notebook's):
    then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _text(value: Any) -> str | None:
    """A usable string field: non-empty, at most MAX_TEXT characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        return None
    return value.strip()


def parse_lesson(content: str, max_examples: int) -> Lesson:
    """The teacher's JSON reply as a Lesson; every field is a plain string, kept as text."""
    text = content.strip()
    if not text:
        raise TeacherInvalid("the teacher's answer is empty")
    fenced = FENCE.match(text)
    text = fenced.group(1) if fenced else text
    if text.startswith("<"):
        raise TeacherInvalid("the teacher answered HTML, not JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TeacherInvalid(f"the teacher's answer is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(data, dict):
        raise TeacherInvalid("the teacher's answer is not a JSON object")
    answer = _text(data.get("answer"))
    if answer is None:
        raise TeacherInvalid("the teacher's answer has no 'answer' string")
    key = _text(data.get("key")) or answer
    if key.lower() not in answer.lower():
        key = answer  # a key the answer does not hold cannot judge answers: the whole answer does
    rows = data.get("examples") if isinstance(data.get("examples"), list) else []
    examples = []
    for row in rows:
        if isinstance(row, dict) and _text(row.get("question")) and _text(row.get("answer")):
            examples.append({"question": _text(row["question"]), "answer": _text(row["answer"])})
    if not examples:
        raise TeacherInvalid("the teacher's answer has no usable examples")
    return Lesson(answer, key, examples[:max_examples])


# --teacher PROVIDER/MODEL: the base URL each provider serves by default, the environment
# variable of its API key, and its protocol
PROVIDERS = {
    "ollama": ("http://localhost:11434/v1", "SEMILLA_TEACHER_API_KEY", "openai"),
    "llamacpp": ("http://localhost:8080/v1", "SEMILLA_TEACHER_API_KEY", "openai"),
    "vllm": ("http://localhost:8000/v1", "SEMILLA_TEACHER_API_KEY", "openai"),
    "semilla": ("http://localhost:8000/v1", "SEMILLA_TEACHER_API_KEY", "openai"),
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY", "openai"),
    "anthropic": ("https://api.anthropic.com", "ANTHROPIC_API_KEY", "anthropic"),
}


def provider_settings(spec: str) -> dict[str, str]:
    """teacher_url, teacher_model, teacher_api_key_env and teacher_api of 'provider/model'
    (ollama/llama3, anthropic/claude-3-5-haiku-latest)."""
    provider, _, model = spec.partition("/")
    if provider not in PROVIDERS or not model:
        raise ValueError(
            f"--teacher must be PROVIDER/MODEL with PROVIDER one of {', '.join(PROVIDERS)} (or give "
            f"--teacher-url and --teacher-model), got {spec!r}"
        )
    url, key_env, api = PROVIDERS[provider]
    return {"teacher_url": url, "teacher_model": model, "teacher_api_key_env": key_env, "teacher_api": api}
