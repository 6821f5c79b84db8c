"""BM25 over one collection's chunk texts with bm25s; rebuilt in memory from the database.

Tokens: lower-cased words of two or more letters, Spanish and English stop words removed
(the corpora semilla is grown on are mostly Spanish), then stemmed with the Snowball stemmer
(PyStemmer) of the collection's language, Spanish or English, whichever of the two stop word
lists its texts use more; no stemming when they use neither (another language).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_SPANISH

logging.getLogger("bm25s").setLevel(logging.WARNING)  # "Building index from tokens" on every build

STOPWORDS = sorted(set(STOPWORDS_SPANISH) | set(STOPWORDS_EN))
LANGUAGE_STOPWORDS = {"spanish": frozenset(STOPWORDS_SPANISH), "english": frozenset(STOPWORDS_EN)}
MIN_STOPWORD_SHARE = 0.1  # of a sample's words: below, the text is in neither language
SAMPLE_CHARS = 200_000
WORD = re.compile(r"(?u)\b\w\w+\b")  # bm25s' own token pattern


def detect_language(texts: list[str]) -> str | None:
    """ "spanish" or "english" by the stop words of the first SAMPLE_CHARS characters; None when
    fewer than MIN_STOPWORD_SHARE of the words are stop words of either."""
    sample, size = [], 0
    for text in texts:
        sample.append(text[: SAMPLE_CHARS - size])
        size += len(sample[-1])
        if size >= SAMPLE_CHARS:
            break
    words = WORD.findall(" ".join(sample).lower())
    if not words:
        return None
    hits = {name: sum(w in stop for w in words) for name, stop in LANGUAGE_STOPWORDS.items()}
    language = max(hits, key=hits.get)
    return language if hits[language] >= MIN_STOPWORD_SHARE * len(words) else None


def tokenize(texts: list[str], stemmer: Stemmer.Stemmer | None) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False)


@dataclass
class LexicalIndex:
    retriever: bm25s.BM25 | None  # None when the collection has no indexable word
    ids: np.ndarray  # (N,) chunk row ids, in the order bm25s numbers the texts
    version: int
    language: str | None = None  # the stemmer's, for queries as for texts

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k best (chunk id, BM25 score) with a score above 0; only `allowed` ids when given."""
        tokens = tokenize([query], stemmer_for(self.language))
        if self.retriever is None or not tokens[0] or k <= 0:
            return []
        mask = np.isin(self.ids, allowed).astype(np.float32) if allowed is not None else None
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, weight_mask=mask)
        return [(int(self.ids[d]), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]


def stemmer_for(language: str | None) -> Stemmer.Stemmer | None:
    return Stemmer.Stemmer(language) if language else None


def build(ids: np.ndarray, texts: list[str], version: int, stem: bool = True) -> LexicalIndex:
    """BM25 over `texts` (ids[i] is texts[i]'s); stemmed in their language unless `stem` is False."""
    language = detect_language(texts) if stem else None
    tokens = tokenize(texts, stemmer_for(language))
    if not any(tokens):
        return LexicalIndex(None, ids, version, language)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    return LexicalIndex(retriever, ids, version, language)
