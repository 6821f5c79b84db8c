"""Dense search over one collection's chunk vectors with FAISS (inner product = cosine on unit vectors).

Exact (`IndexFlatIP`) up to HNSW_FROM vectors, HNSW beyond: bench/retrieval.py measures where
exact search stops being fast enough and how much recall HNSW keeps. Ids are chunk row ids.
The file on disk is a cache of the database; `load` answers None when it is missing, damaged
or stale, and the caller rebuilds it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # before importing it: its INFO lines are noise

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from semilla.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)
# one query at a time: OpenMP threads buy nothing and spin against the engine's and the HTTP
# server's threads (100k exact: 112 ms median with 2 threads on a busy 2-core VM, 12 ms with 1)
faiss.omp_set_num_threads(1)

HNSW_FROM = 50_000  # vectors; beyond, exact search P95 passes ~30 ms on a busy 2-core VM (bench/README.md)
HNSW_M = 32  # graph neighbours per vector
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256  # candidates per query (recall@10 0.998 of exact at 100k); at least k


@dataclass
class VectorIndex:
    index: faiss.IndexIDMap2
    version: int  # the collection's version these vectors reflect

    @property
    def exact(self) -> bool:
        return not isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSWFlat)

    @property
    def size(self) -> int:
        return self.index.ntotal

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k best (chunk id, cosine) for one query vector; only `allowed` ids when given."""
        if self.size == 0 or k <= 0:
            return []
        selector = faiss.IDSelectorBatch(allowed.astype(np.int64)) if allowed is not None else None
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k), sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(
            query.reshape(1, -1).astype(np.float32), min(k, self.size), params=params
        )
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]


def new_index(dim: int, expected: int) -> faiss.IndexIDMap2:
    """An empty index for `expected` vectors: exact below HNSW_FROM, HNSW from there."""
    if expected >= HNSW_FROM:
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        inner = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap2(inner)


def build(ids: np.ndarray, vectors: np.ndarray, dim: int, version: int) -> VectorIndex:
    index = VectorIndex(new_index(dim, len(ids)), version)
    index.add(ids, vectors)
    return index


def save(index: VectorIndex, path: Path) -> None:
    """The index and a sidecar naming its version and size, each written atomically."""
    atomic_write_bytes(path, faiss.serialize_index(index.index).tobytes())
    atomic_write_text(path.with_suffix(".json"), json.dumps({"version": index.version, "size": index.size}))


def load(path: Path, version: int, size: int) -> VectorIndex | None:
    """The saved index if it is readable and matches the database (`version`, `size` chunks)."""
    meta = path.with_suffix(".json")
    if not path.exists() or not meta.exists():
        return None
    try:
        stamp = json.loads(meta.read_text())
        index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    except Exception as e:  # any damage (truncation, garbage) means: rebuild
        log.warning("the vector index %s is damaged (%s); rebuilding it from the database", path, e)
        return None
    if stamp.get("version") != version or index.ntotal != size:
        log.info("the vector index %s is older than the database; rebuilding it", path)
        return None
    return VectorIndex(index, version)
