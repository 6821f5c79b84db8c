"""BM25 over one collection's chunk texts with bm25s; rebuilt in memory from the database.

Tokens: lower-cased words of two or more letters, Spanish and English stop words removed
(the corpora semilla is grown on are mostly Spanish), then stemmed with the Snowball stemmer
(PyStemmer) of the collection's language, Spanish or English, whichever of the two stop word
lists its texts use more; no stemming when they use neither (another language).

Query expansion (pseudo-relevance feedback in the manner of RM3, at Anserini's RM3 defaults):
the best terms of the chunks a first search ranked highest are added to the query. Unlike RM3's
term frequencies weighted by query likelihood, each feedback chunk's terms weigh what they
score in it (BM25: tf and idf, so words common to the whole collection weigh little), divided
by its total, so that each chunk has one vote; the FEEDBACK_TERMS heaviest terms of their sum
share 1 - ORIGINAL_WEIGHT, the query's own terms ORIGINAL_WEIGHT; a chunk's score is the
weighted sum of its terms' BM25 scores.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

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
# RM3's defaults in Anserini (fbDocs, fbTerms, originalQueryWeight), not tuned on semilla's
# benchmark: bench/retrieval.py measures them and a cross-validated choice (bench/README.md)
FEEDBACK_CHUNKS = 10
FEEDBACK_TERMS = 10
ORIGINAL_WEIGHT = 0.5


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
    # each chunk's terms and their BM25 scores, made on the first expanded search (chunk_terms)
    _chunk_terms: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k best (chunk id, BM25 score) with a score above 0; only `allowed` ids when given."""
        tokens = tokenize([query], stemmer_for(self.language))
        if self.retriever is None or not tokens[0] or k <= 0:
            return []
        mask = np.isin(self.ids, allowed).astype(np.float32) if allowed is not None else None
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, weight_mask=mask)
        return [(int(self.ids[d]), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def expanded_search(
        self,
        query: str,
        feedback: list[int],
        k: int,
        allowed: np.ndarray | None = None,
        terms: int = FEEDBACK_TERMS,
        original_weight: float = ORIGINAL_WEIGHT,
    ) -> list[tuple[int, float]]:
        """The k best (chunk id, score) for `query` expanded with the `terms` best terms of the
        `feedback` chunk ids (a first search's best; see the module's docstring); only `allowed`
        ids when given."""
        if self.retriever is None or k <= 0:
            return []
        vocab, n_terms = self.retriever.vocab_dict, len(self.retriever.scores["indptr"]) - 1
        # bm25s' vocabulary also holds "" (an id past the score matrix): only scored terms count
        tokens = tokenize([query], stemmer_for(self.language))[0]
        own = [vocab[t] for t in tokens if vocab.get(t, n_terms) < n_terms]
        weights: dict[int, float] = {}
        for term in own:  # a term said twice counts twice, as in search
            weights[term] = weights.get(term, 0.0) + original_weight / len(own)
        for term, weight in self.feedback_terms(feedback, terms).items():
            weights[term] = weights.get(term, 0.0) + (1 - original_weight) * weight
        if not weights:
            return []
        scores = self.score_terms(weights)
        if allowed is not None:
            scores[~np.isin(self.ids, allowed)] = 0.0
        best = top_positions(scores, k)
        return [(int(self.ids[d]), float(scores[d])) for d in best if scores[d] > 0]

    def feedback_terms(self, feedback: list[int], terms: int = FEEDBACK_TERMS) -> dict[int, float]:
        """The `terms` heaviest term ids of the `feedback` chunks, weights summing to 1."""
        positions = np.flatnonzero(np.isin(self.ids, feedback))
        if not len(positions):
            return {}
        starts, chunk_terms, scores = self.chunk_terms()
        total = np.zeros(len(self.retriever.scores["indptr"]) - 1)  # per term
        for p in positions:
            mine = scores[starts[p] : starts[p + 1]]
            if mine.sum() > 0:
                total[chunk_terms[starts[p] : starts[p + 1]]] += mine / mine.sum()
        best = top_positions(total, terms)
        best = best[total[best] > 0]
        return dict(zip(best.tolist(), (total[best] / total[best].sum()).tolist(), strict=True))

    def chunk_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts (N + 1,), term ids, scores): chunk i's terms are terms[starts[i]:starts[i + 1]].

        bm25s keeps its scores by term (a CSC matrix: chunks per term); this is the transpose,
        as big again, so it is made only when an expanded search needs it."""
        if self._chunk_terms is None:
            matrix = self.retriever.scores
            by_term = np.diff(matrix["indptr"])
            entry_terms = np.repeat(np.arange(len(by_term), dtype=np.int32), by_term)
            order = np.argsort(matrix["indices"], kind="stable")
            counts = np.bincount(matrix["indices"], minlength=len(self.ids))
            starts = np.concatenate([[0], np.cumsum(counts)])
            self._chunk_terms = (starts, entry_terms[order], matrix["data"][order])
        return self._chunk_terms

    def score_terms(self, weights: dict[int, float]) -> np.ndarray:
        """(N,) the weighted sum of each chunk's BM25 scores for the terms of `weights`."""
        matrix = self.retriever.scores
        indptr, indices, data = matrix["indptr"], matrix["indices"], matrix["data"]
        scores = np.zeros(len(self.ids), np.float64)
        for term, weight in weights.items():
            span = slice(indptr[term], indptr[term + 1])
            scores[indices[span]] += weight * data[span]
        return scores


def top_positions(values: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k largest values, largest first (a partition, then a sort of k)."""
    k = min(k, len(values))
    if k <= 0:
        return np.zeros(0, np.int64)
    best = np.argpartition(-values, k - 1)[:k]
    return best[np.argsort(-values[best], kind="stable")]


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
