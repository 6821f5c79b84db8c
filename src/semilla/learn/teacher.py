"""The teacher: any OpenAI-compatible chat service (Ollama, llama.cpp's server, vLLM, another
semilla, OpenAI) asked, for one gap, for a reference answer, its key fact and a few
question/answer examples. Its reply is data: parsed as JSON strings and stored, never obeyed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from semilla.learn.config import LearnConfig

MAX_TEXT = 2000  # characters of one question or answer; a longer one is not a usable example

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
    """One OpenAI-compatible endpoint and model; the API key is read from an environment variable."""

    def __init__(self, cfg: LearnConfig):
        import openai

        for name in ("httpx", "httpx2"):  # the client logs every request at INFO: not for the terminal
            logging.getLogger(name).setLevel(logging.WARNING)
        self.cfg = cfg
        self.client = openai.OpenAI(
            base_url=cfg.teacher_url,
            api_key=os.environ.get(cfg.teacher_api_key_env) or "not-needed",
            timeout=cfg.teacher_timeout,
            max_retries=1,
        )

    def teach(self, concept: str, question: str, language: str) -> Lesson:
        """The teacher's lesson for one gap question; raises TeacherUnreachable or TeacherInvalid."""
        import openai

        system = SYSTEM.format(n=self.cfg.examples_per_gap, language=LANGUAGES[language])
        try:
            reply = self.client.chat.completions.create(
                model=self.cfg.teacher_model,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Concept: {concept}\nQuestion: {question}"},
                ],
                temperature=0.7,
            )
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as e:
            raise TeacherUnreachable(f"{self.cfg.teacher_url}: {type(e).__name__}: {e}") from None
        except openai.APIStatusError as e:
            raise TeacherInvalid(f"the teacher refused the request (HTTP {e.status_code})") from None
        except ValueError as e:  # a 200 whose body is not a completion (HTML, junk)
            raise TeacherInvalid(f"the teacher's reply is not a chat completion: {e}") from None
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices or choices[0].message is None:
            raise TeacherInvalid("the teacher's reply has no message")
        return parse_lesson(choices[0].message.content or "", self.cfg.examples_per_gap)

    def provenance(self, concept: str) -> dict[str, Any]:
        return {
            "teacher": self.cfg.teacher_url,
            "model": self.cfg.teacher_model,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "concept": concept,
        }


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


# --teacher PROVIDER/MODEL: the OpenAI-compatible base URL each provider serves by default, and
# the environment variable of its API key
PROVIDERS = {
    "ollama": ("http://localhost:11434/v1", "SEMILLA_TEACHER_API_KEY"),
    "llamacpp": ("http://localhost:8080/v1", "SEMILLA_TEACHER_API_KEY"),
    "vllm": ("http://localhost:8000/v1", "SEMILLA_TEACHER_API_KEY"),
    "semilla": ("http://localhost:8000/v1", "SEMILLA_TEACHER_API_KEY"),
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
}


def provider_settings(spec: str) -> dict[str, str]:
    """teacher_url, teacher_model and teacher_api_key_env of 'provider/model' (ollama/llama3)."""
    provider, _, model = spec.partition("/")
    if provider not in PROVIDERS or not model:
        raise ValueError(
            f"--teacher must be PROVIDER/MODEL with PROVIDER one of {', '.join(PROVIDERS)} (or give "
            f"--teacher-url and --teacher-model), got {spec!r}"
        )
    url, key_env = PROVIDERS[provider]
    return {"teacher_url": url, "teacher_model": model, "teacher_api_key_env": key_env}
