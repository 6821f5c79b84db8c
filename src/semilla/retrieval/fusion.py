"""Reciprocal rank fusion: one ranking from several, by 1 / (k + rank) summed over lists.

rrf([[7, 3], [3, 9]]) -> [(3, 1/61 + 1/62... ), ...]: an id high in both lists wins.
"""

from __future__ import annotations

RRF_K = 60  # Cormack et al.'s constant; bench/retrieval.py tries others


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
