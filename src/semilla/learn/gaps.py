"""Does the model know? It answers a question greedily and with a few samples; the seed's signals
say whether the answer is a gap (too short, an uncertainty marker, a low mean token probability),
and two more: samples that disagree with the greedy answer, and an answer that never names the
concept asked about (a model that learned "X es ..." answers confidently about another X).
Recall asks whether an answer holds a fact's key string."""

from __future__ import annotations

import math
from typing import Any

from semilla.api import LanguageModel
from semilla.learn.config import LearnConfig
from semilla.learn.questions import words


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over lower-case words (Self-Instruct's near-duplicate test).

    Written here rather than taken from rouge-score, whose tokenizer drops every non-ASCII letter
    (Spanish "¿Qué" would become "qu")."""
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 0.0
    lcs = lcs_length(wa, wb)
    return 0.0 if lcs == 0 else 2 * lcs / (len(wa) + len(wb))


def ask(lm: LanguageModel, question: str, concept: str, cfg: LearnConfig, seed: int) -> dict[str, Any]:
    """The student's greedy answer, its samples, and the gap signals:
    {"answer", "samples", "signals": {...}, "score", "gap"}."""
    prompt = lm.chat_ids([{"role": "user", "content": question}])
    greedy_cfg = lm.settings(temperature=0.0, max_new_tokens=cfg.max_answer_tokens)
    greedy = lm.complete([prompt], greedy_cfg)[0]
    samples = []
    if cfg.num_samples:
        sample_cfg = lm.settings(temperature=0.8, top_p=0.95, max_new_tokens=cfg.max_answer_tokens)
        seeds = [seed + i for i in range(cfg.num_samples)]
        samples = [c.text for c in lm.complete([prompt] * cfg.num_samples, sample_cfg, seeds)]
    answer = greedy.text.strip()
    confidence = math.exp(sum(greedy.logprobs) / len(greedy.logprobs)) if greedy.logprobs else 0.0
    agreement = sum(rouge_l(answer, s) for s in samples) / len(samples) if samples else 1.0
    lowered = answer.lower()
    signals = {
        "chars": len(answer),
        "too_short": len(answer) < cfg.min_answer_chars,
        "uncertain": any(m.lower() in lowered for m in cfg.uncertainty_markers),
        "confidence": round(confidence, 4),
        "low_confidence": confidence < cfg.min_confidence,
        "disagreement": round(1.0 - agreement, 4),
        "disagrees": 1.0 - agreement > cfg.max_disagreement,
        "off_topic": cfg.require_concept and not set(words(concept)) & set(words(answer)),
    }
    flags = ("too_short", "uncertain", "low_confidence", "disagrees", "off_topic")
    score = sum(signals[f] for f in flags) / len(flags)  # share of the signals that say "gap"
    return {"answer": answer, "samples": samples, "signals": signals, "score": score, "gap": score > 0}


def knows(answer: str, key: str) -> bool:
    """A fact is recalled when its key string is in the answer (case-insensitive)."""
    return key.strip().lower() in answer.lower()


def recall(lm: LanguageModel, facts: list[dict[str, str]], max_tokens: int) -> float:
    """Share of `facts` ({"question", "key"}) whose key is in the model's greedy answer."""
    if not facts:
        return 0.0
    cfg = lm.settings(temperature=0.0, max_new_tokens=max_tokens)
    prompts = [lm.chat_ids([{"role": "user", "content": f["question"]}]) for f in facts]
    answers = [c.text for c in lm.complete(prompts, cfg)]
    return sum(knows(a, f["key"]) for a, f in zip(answers, facts, strict=True)) / len(facts)
