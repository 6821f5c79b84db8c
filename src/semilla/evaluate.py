"""Is the model any good? Perplexity on held-out text, quality of generated samples, BLEU/chrF
against reference continuations, and readability. `semilla eval` prints and saves the report.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semilla.api import LanguageModel
from semilla.batches import TokenDataset, is_prepared
from semilla.config import EVAL_SAMPLING, GenerateConfig
from semilla.errors import DataError
from semilla.tokenizer import Tokenizer

SETTINGS_SHOWN = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")

# --- held-out likelihood ------------------------------------------------------------------


def token_windows(ids: torch.Tensor, block_size: int, stride: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Sliding windows of up to block_size + 1 tokens, `stride` apart. Each yields
    (window, n_new): only its last n_new targets are new, so every token is scored once,
    with as much context as the window gives (Hugging Face's sliding-window perplexity)."""
    stride = min(stride, block_size)
    last = len(ids) - 1  # targets are ids[1..last]
    scored = 0
    for begin in range(0, last, stride):
        end = min(begin + block_size, last)
        yield ids[begin : end + 1], end - scored
        scored = end
        if end == last:
            break


@torch.no_grad()
def likelihood_metrics(
    lm: LanguageModel,
    ids: torch.Tensor,
    n_chars: int,
    stride: int | None = None,
    max_tokens: int | None = None,
    counted: torch.Tensor | None = None,
) -> dict[str, float]:
    """Perplexity, cross-entropy, token accuracy, top-5 accuracy and bits per character.

    counted: one bool per token of `ids`, whether predicting it counts (chat data: the
    assistant turns, see assistant_targets); then bits per character is left out, as the
    characters of the other turns are not scored."""
    if max_tokens and len(ids) > max_tokens + 1:
        n_chars = max(1, round(n_chars * max_tokens / (len(ids) - 1)))  # characters scale with tokens
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise DataError("the evaluation text is empty: nothing to score")
    block = lm.model.config.block_size
    stride = stride or block
    nll = correct = top5 = count = 0.0
    done = 0  # targets scored so far: this window's are ids[done + 1 : done + 1 + n_new]
    for window, n_new in token_windows(ids, block, stride):
        x, y = window[None, :-1].to(lm.device), window[None, 1:].to(lm.device)
        logits = lm.model(x).float()[0, -n_new:]
        targets = y[0, -n_new:]
        if counted is not None:
            keep = counted[done + 1 : done + 1 + n_new].to(lm.device)
            logits, targets = logits[keep], targets[keep]
        done += n_new
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        best5 = logits.topk(min(5, logits.size(-1)), -1).indices
        correct += float((best5[:, 0] == targets).sum())
        top5 += float((best5 == targets[:, None]).any(-1).sum())
        count += len(targets)
    if not count:
        raise DataError("nothing to score: the evaluation data has no assistant turns")
    ce = nll / count
    metrics = {
        "tokens": int(count),
        "cross_entropy": ce,
        "perplexity": math.exp(min(ce, 50)),
        "token_accuracy": correct / count,
        "top5_accuracy": top5 / count,
    }
    if counted is None:
        metrics["bits_per_char"] = nll / math.log(2) / max(1, n_chars)
    return metrics


def load_eval_tokens(lm: LanguageModel, source: str | None, split: str) -> tuple[torch.Tensor, int, str]:
    """(token ids, characters they cover, description) from a prepared split or a text file."""
    if source is None:
        source = default_data_dir(lm)
    path = Path(source)
    if is_prepared(path):
        ids = prepared_split_ids(path, split)
        meta = json.loads((path / "meta.json").read_text())
        chars = meta["splits"][split]["characters"]
        return ids, chars, f"{path} ({split} split)"
    text = read_eval_text(path)
    return text_tokens(lm, text), len(text), str(path)


def prepared_split_ids(path: Path, split: str) -> torch.Tensor:
    ds = TokenDataset(path, split)
    if not ds.n_tokens:
        raise DataError(f"the {split} split of {path} is empty; pick --split val or another --data")
    return torch.from_numpy(np.concatenate([s[:] for s in ds.shards]).astype(np.int64))


def read_eval_text(path: Path) -> str:
    if path.is_dir():
        raise DataError(f"{path} is a folder but not a prepared dataset (no meta.json): give --data a "
                        "prepared dataset or one text file")  # fmt: skip
    if not path.is_file():
        raise DataError(f"evaluation data not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"the evaluation file {path} is empty")
    return text


def text_tokens(lm: LanguageModel, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.bos_id] + lm.tokenizer.encode(text))


def eval_text(source: str, split: str) -> tuple[str, str]:
    """(text, description) of a text file, or of one split of a prepared dataset decoded with
    its own tokenizer: text any model can score, whatever its tokenizer."""
    path = Path(source)
    if is_prepared(path):
        ids = prepared_split_ids(path, split).tolist()
        return Tokenizer.load(path).decode(ids, skip_special_tokens=True), f"{path} ({split} split)"
    return read_eval_text(path), str(path)


def assistant_targets(source: str, split: str) -> torch.Tensor | None:
    """For prepared chat data, which tokens of the split count (the assistant turns), aligned
    with load_eval_tokens' ids; None for text, where every token counts."""
    if not is_prepared(source):
        return None
    masks = TokenDataset(source, split).masks
    return torch.from_numpy(np.concatenate(masks)).bool() if masks else None


def default_data_dir(lm: LanguageModel) -> str:
    """The prepared data the checkpoint was trained on (its run's data/, or train.data)."""
    ckpt = Path(lm.config.get("path", "."))
    for candidate in (ckpt.parent / "data", Path((lm.config.get("train") or {}).get("data") or "")):
        if str(candidate) and is_prepared(candidate):
            return str(candidate)
    raise DataError("no evaluation data: pass --data (a prepared dataset or a text file)")


# --- generated samples --------------------------------------------------------------------


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(samples: list[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams over every sample (Li et al. 2016)."""
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: list[list[str]], n: int = 4) -> float:
    """Share of n-grams within a sample that repeat an earlier n-gram of the same sample."""
    repeated = total = 0
    for s in samples:
        grams = ngrams(s, n)
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / total if total else 0.0


def token_entropy(token_lists: list[list[int]]) -> float:
    """Entropy (bits) of the unigram distribution of generated tokens."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def self_bleu(texts: list[str]) -> float:
    """Mean BLEU of each sample against all the others (lower = more diverse)."""
    import sacrebleu

    if len(texts) < 2:
        return 0.0
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


SPANISH_HINTS = {
    "que",
    "de",
    "la",
    "el",
    "y",
    "en",
    "los",
    "se",
    "del",
    "las",
    "por",
    "con",
    "una",
    "su",
    "para",
    "es",
}
ENGLISH_HINTS = {
    "the",
    "and",
    "of",
    "to",
    "a",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "with",
    "he",
    "as",
    "his",
    "you",
}


def readability(text: str) -> dict[str, Any]:
    """Flesch reading ease (English) or Fernández-Huerta (Spanish); syllables from pyphen's
    hyphenation dictionaries, so counts are approximate."""
    import pyphen

    tokens = re.findall(r"[^\W\d_]+", text.lower())
    if not tokens:
        return {}
    spanish = sum(w in SPANISH_HINTS for w in tokens) > sum(w in ENGLISH_HINTS for w in tokens)
    dic = pyphen.Pyphen(lang="es" if spanish else "en_US")
    syllables = sum(len(dic.positions(w)) + 1 for w in tokens)
    sentences = max(1, len(re.findall(r"[.!?]+", text)))
    per_word, words_per_sentence = syllables / len(tokens), len(tokens) / sentences
    if spanish:  # Fernández-Huerta (1959)
        return {
            "language": "es",
            "fernandez_huerta": round(206.84 - 60 * per_word - 1.02 * (100 / words_per_sentence), 2),
        }
    return {
        "language": "en",
        "flesch_reading_ease": round(206.835 - 1.015 * words_per_sentence - 84.6 * per_word, 2),
    }


def sample_metrics(
    lm: LanguageModel, prompts: list[str], num_samples: int, cfg: GenerateConfig
) -> dict[str, Any]:
    """Diversity, repetition, entropy and length of num_samples continuations per prompt."""
    texts, token_lists = [], []
    for prompt in prompts:
        seeds = [None if cfg.seed is None else cfg.seed + i for i in range(num_samples)]
        for c in lm.complete([prompt] * num_samples, cfg, seeds):
            texts.append(c.text)
            token_lists.append(c.tokens)
    split = [words(t) for t in texts]
    report = {
        "samples": len(texts),
        "distinct_1": distinct_n(split, 1),
        "distinct_2": distinct_n(split, 2),
        "self_bleu": self_bleu(texts),
        "repetition_rate_4gram": repetition_rate(split, 4),
        "token_entropy_bits": token_entropy(token_lists),
        "mean_length_tokens": sum(map(len, token_lists)) / max(1, len(token_lists)),
        "mean_length_words": sum(map(len, split)) / max(1, len(split)),
    }
    report.update(readability(" ".join(texts)))
    report["examples"] = texts[:3]
    return report


def reference_metrics(
    lm: LanguageModel,
    ids: torch.Tensor,
    n: int,
    prompt_tokens: int,
    reference_tokens: int,
    cfg: GenerateConfig,
) -> dict[str, float]:
    """BLEU and chrF (sacrebleu) of continuations against the text that really followed."""
    import sacrebleu

    span = prompt_tokens + reference_tokens
    if len(ids) < span:
        raise DataError(f"the evaluation text has {len(ids)} tokens; reference scoring needs at least {span}")
    starts = torch.linspace(0, len(ids) - span, n).long().unique().tolist()
    prompts = [ids[s : s + prompt_tokens].tolist() for s in starts]
    references = [
        lm.tokenizer.decode(ids[s + prompt_tokens : s + span].tolist(), skip_special_tokens=True)
        for s in starts
    ]
    cfg = GenerateConfig(**{**cfg.__dict__, "max_new_tokens": reference_tokens, "stop": []})
    hypotheses = [c.text for c in lm.complete(prompts, cfg)]
    return {
        "pairs": len(starts),
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def evaluate(
    lm: LanguageModel,
    data: str | None = None,
    split: str = "test",
    stride: int | None = None,
    max_tokens: int | None = None,
    prompts: list[str] | None = None,
    num_samples: int = 8,
    references: int = 16,
    prompt_tokens: int = 32,
    reference_tokens: int = 32,
    cfg: GenerateConfig | None = None,
    text: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The full report: likelihood on held-out text, sample metrics, reference metrics, and
    what was measured (data, split, sampling settings). `text` = (text, description) scores
    that text with the model's own tokenizer instead of `data`."""
    cfg = (cfg or GenerateConfig(**EVAL_SAMPLING)).validate()
    counted = None  # which targets count: chat data is scored on the assistant turns
    if text is None:
        source = data if data is not None else default_data_dir(lm)
        ids, chars, described = load_eval_tokens(lm, source, split)
        counted = assistant_targets(source, split)
    else:
        ids, chars, described = text_tokens(lm, text[0]), len(text[0]), text[1]
    report: dict[str, Any] = {
        "checkpoint": lm.config.get("path"),
        "data": described,
        "settings": {
            **{k: getattr(cfg, k) for k in SETTINGS_SHOWN},
            "num_samples": num_samples,
            "references": references,
            "stride": stride or lm.model.config.block_size,
            "max_tokens": max_tokens,
        },
    }
    report["likelihood"] = likelihood_metrics(lm, ids, chars, stride, max_tokens, counted)
    if num_samples:
        report["samples"] = sample_metrics(lm, prompts or [""], num_samples, cfg)
    if references:
        greedy = GenerateConfig(**{**cfg.__dict__, "temperature": 0.0})
        report["references"] = reference_metrics(lm, ids, references, prompt_tokens, reference_tokens, greedy)
    return report


def compare(lms: list[LanguageModel], data: str | None = None, split: str = "test", **kwargs: Any) -> dict:
    """Evaluate several models on the same text: the data of the first (or `data`). Where the
    tokenizers differ, each scores the text through its own and the comparable figure is bits
    per character, which the result's `note` says. kwargs are `evaluate`'s."""
    source = data or default_data_dir(lms[0])
    first = lms[0].tokenizer.hf.to_str()
    if all(lm.tokenizer.hf.to_str() == first for lm in lms[1:]):
        return {"compare": [evaluate(lm, source, split, **kwargs) for lm in lms]}
    text, described = eval_text(source, split)
    max_tokens = kwargs.pop("max_tokens", None)
    if max_tokens:  # the same characters for every model: those of the first one's tokens
        tok = lms[0].tokenizer
        text = tok.decode(tok.encode(text)[:max_tokens])
    return {
        "note": "the models' tokenizers differ: compare bits_per_char (perplexity is per token of each "
        "model's own tokenizer)",
        "compare": [evaluate(lm, source, split, text=(text, described), **kwargs) for lm in lms],
    }


def format_report(reports: list[dict[str, Any]], note: str | None = None) -> str:
    """A side-by-side table of one or more reports, under what they measured."""
    rows: list[tuple[str, list[str]]] = []
    for section in ("likelihood", "samples", "references"):
        keys = [k for k, v in reports[0].get(section, {}).items() if isinstance(v, int | float)]
        for k in keys:
            rows.append((f"{section}.{k}", [_fmt(r.get(section, {}).get(k)) for r in reports]))
        for k in ("language",):
            if k in reports[0].get(section, {}):
                rows.append((f"{section}.{k}", [str(r.get(section, {}).get(k, "")) for r in reports]))
    names = [Path(str(r.get("checkpoint"))).as_posix()[-40:] for r in reports]
    width = max(len(r[0]) for r in rows)
    col = max(14, *(len(n) for n in names))
    settings = reports[0].get("settings", {})
    head = [f"data: {reports[0].get('data')}"]
    head.append("sampling: " + ", ".join(f"{k} {settings[k]}" for k in SETTINGS_SHOWN if k in settings))
    if note:
        head.append(f"note: {note}")
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{v:>{col}}" for v in values) for name, values in rows]
    return "\n".join(head + [""] + lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)
