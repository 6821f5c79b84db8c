"""BM25 over one collection's chunk texts with bm25s; rebuilt in memory from the database.

Tokens: lower-cased words of two or more letters, Spanish and English stop words removed
(the corpora semilla is grown on are mostly Spanish).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_SPANISH

logging.getLogger("bm25s").setLevel(logging.WARNING)  # "Building index from tokens" on every build

STOPWORDS = sorted(set(STOPWORDS_SPANISH) | set(STOPWORDS_EN))


def tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


@dataclass
class LexicalIndex:
    retriever: bm25s.BM25 | None  # None when the collection has no indexable word
    ids: np.ndarray  # (N,) chunk row ids, in the order bm25s numbers the texts
    version: int

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k best (chunk id, BM25 score) with a score above 0; only `allowed` ids when given."""
        tokens = tokenize([query])
        if self.retriever is None or not tokens[0] or k <= 0:
            return []
        mask = np.isin(self.ids, allowed).astype(np.float32) if allowed is not None else None
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, weight_mask=mask)
        return [(int(self.ids[d]), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]


def build(ids: np.ndarray, texts: list[str], version: int) -> LexicalIndex:
    tokens = tokenize(texts)
    if not any(tokens):
        return LexicalIndex(None, ids, version)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    return LexicalIndex(retriever, ids, version)
