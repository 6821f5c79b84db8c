"""Fusing a BM25 ranking with a dense one.

rrf: reciprocal rank fusion, 1 / (k + rank) summed over lists (Cormack et al.); it sees only
ranks, so a weak ranking counts as much as a strong one.
    rrf([[7, 3], [3, 9]]) -> [(3, 1/62 + 1/61), (7, 1/61), (9, 1/62)]

relative_score: each list's scores min-max normalised to [0, 1] over its candidates, then a
weighted sum, a candidate missing from a list counting 0 there (Weaviate's relativeScoreFusion,
Elasticsearch's linear retriever with the minmax normaliser); it keeps how far ahead a hit is.
    relative_score([[(7, 12.0), (3, 6.0)], [(3, 0.8), (9, 0.4)]], [0.5, 0.5])
    -> [(3, 0.5 * 0 + 0.5 * 1), (7, 0.5), (9, 0)]   (ties by id)
"""

from __future__ import annotations

# The first is the default. relative_score because RRF gives a weak ranking as much say as a
# strong one: with all-MiniLM-L6-v2 (English) on Spanish text, RRF fell 0.02 nDCG@10 below
# BM25 alone and relative_score did not (bench/README.md, Retrieval).
FUSIONS = ("relative_score", "rrf")
RRF_K = 60  # Cormack et al.'s constant; bench/retrieval.py tries others
DENSE_WEIGHT = 0.3  # relative_score's weight of the dense list (BM25's: 1 - it); bench/retrieval.py


def rrf(
    rankings: list[list[int]], k: int = RRF_K, weights: list[float] | None = None
) -> list[tuple[int, float]]:
    """Ids sorted by fused score (best first), each with its score; ranks start at 1."""
    weights = weights or [1.0] * len(rankings)
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def relative_score(rankings: list[list[tuple[int, float]]], weights: list[float]) -> list[tuple[int, float]]:
    """Ids sorted by the weighted sum of their min-max normalised scores (best first).

    A list whose scores are all equal gives each of its candidates 1 (they all lead it)."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        if not ranking:
            continue
        values = [s for _, s in ranking]
        low, span = min(values), max(values) - min(values)
        for item, score in ranking:
            scores[item] = scores.get(item, 0.0) + weight * ((score - low) / span if span > 0 else 1.0)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
