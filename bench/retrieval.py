"""Retrieval quality on Don Quijote, and FAISS speed/recall at 100k vectors.

    .venv/bin/python bench/retrieval.py quality            # BM25, dense (MiniLM, e5, semilla), hybrid, expansion
    .venv/bin/python bench/retrieval.py quality --checkpoint runs/x/best
    .venv/bin/python bench/retrieval.py ann                # exact vs HNSW, 100k synthetic vectors
    .venv/bin/python bench/retrieval.py collection         # a 100k-chunk collection end to end

quality: each chapter heading of ../shared/data/quijote.txt ("Capítulo VIII. Del buen suceso
que el valeroso don Quijote tuvo en la espantable ... aventura de los molinos de viento ...")
without its "Capítulo N." is a query; the chapter's text, heading removed, cut into chunks as
collections cut documents, is the set of relevant chunks. All chapters' chunks form the corpus.
recall@5 = relevant chunks in the top 5 / min(5, relevant chunks) (capped recall, as BEIR);
nDCG@10 with binary relevance. Embeddings are cached under --cache-dir (MiniLM takes ~10 min
for the 2,300 chunks on 2 busy cores, multilingual-e5-small about 50).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from semilla.retrieval import lexical, vector_index
from semilla.retrieval.chunking import ChunkConfig, chunk_text
from semilla.retrieval.embedders import E5, MINILM, load_embedder
from semilla.retrieval.fusion import DENSE_WEIGHT, relative_score, rrf

ROOT = Path(__file__).resolve().parents[1]
QUIJOTE = ROOT.parent / "shared" / "data" / "quijote.txt"
RESULTS = ROOT / "bench" / "results"
HEADING = re.compile(r"^Capítulo [^.]+\.\s*")
DEPTH = 50  # candidates per ranking before fusion, as Collections.search


# --- the benchmark ---------------------------------------------------------------------------


def chapters(text: str) -> list[tuple[str, str]]:
    """(query, chapter text) per chapter: the heading paragraph without "Capítulo N.", and the rest."""
    out: list[tuple[str, str]] = []
    paragraphs = re.split(r"\n\s*\n", text)
    heading, body = None, []
    for p in paragraphs:
        if p.startswith("Capítulo "):
            if heading is not None:
                out.append((heading, "\n\n".join(body)))
            heading, body = " ".join(HEADING.sub("", p).split()), []
        elif heading is not None and not re.match(r"^(Segunda|Primera) parte", p.strip()):
            body.append(p)
    if heading is not None:
        out.append((heading, "\n\n".join(body)))
    return out


def corpus(chunking: ChunkConfig) -> tuple[list[str], list[str], list[set[int]]]:
    """(queries, chunk texts, relevant chunk positions per query)."""
    queries, texts, relevant = [], [], []
    for query, body in chapters(QUIJOTE.read_text(encoding="utf-8")):
        pieces = chunk_text(body, chunking)
        queries.append(query)
        relevant.append(set(range(len(texts), len(texts) + len(pieces))))
        texts.extend(pieces)
    return queries, texts, relevant


def recall_at(ranked: list[int], relevant: set[int], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / min(k, len(relevant))


def ndcg_at(ranked: list[int], relevant: set[int], k: int) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def score(rankings: list[list[int]], relevant: list[set[int]]) -> dict[str, float]:
    return {
        "recall@5": float(np.mean([recall_at(r, rel, 5) for r, rel in zip(rankings, relevant, strict=True)])),
        "ndcg@10": float(np.mean([ndcg_at(r, rel, 10) for r, rel in zip(rankings, relevant, strict=True)])),
    }


def cached_embeddings(name: str, texts: list[str], cache_dir: Path) -> np.ndarray:
    key = hashlib.sha256((name + "\0" + "\0".join(texts)).encode()).hexdigest()[:16]
    path = cache_dir / f"{Path(name).name}-{key}.npy"
    if path.exists():
        return np.load(path)
    embedder = load_embedder(name)
    start, parts = time.perf_counter(), []
    for i in range(0, len(texts), 64):
        parts.append(embedder.embed(texts[i : i + 64]))
        print(f"  {name}: {min(i + 64, len(texts))}/{len(texts)} chunks embedded", file=sys.stderr, end="\r")
    vectors = np.concatenate(parts)
    print(f"\n  {name}: {len(texts)} chunks in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def dense_rankings(
    name: str, queries: list[str], texts: list[str], cache_dir: Path
) -> list[list[tuple[int, float]]]:
    ids = np.arange(len(texts), dtype=np.int64)
    chunks = cached_embeddings(name, texts, cache_dir)
    index = vector_index.build(ids, chunks, chunks.shape[1], 0)
    query_vectors = load_embedder(name).embed_query(queries)
    return [index.search(q, DEPTH) for q in query_vectors]


def train_small_model(out: Path) -> Path:
    """A small semilla model on the whole Quijote (BPE 4096, 2 layers x 128, 300 steps of 8 x 256 tokens)."""
    from semilla.config import resolve_configs
    from semilla.data import prepare
    from semilla.train import train

    data = out / "data"
    if not (out / "run" / "best").exists():
        prepare([str(QUIJOTE)], str(data), tokenizer="bpe", vocab_size=4096)
        model_cfg, train_cfg = resolve_configs(
            "tiny",
            overrides=dict(
                data=str(data),
                out_dir=str(out / "run"),
                vocab_size=4096,
                block_size=256,
                n_layer=2,
                n_head=4,
                n_embd=128,
                batch_size=8,
                max_iters=300,
                warmup_iters=30,
                learning_rate=3e-3,
                eval_interval=150,
                eval_iters=5,
                device="cpu",
            ),  # fmt: skip
            environ={},
        )
        train(model_cfg, train_cfg)
    return out / "run" / "best"


def ids_of(rankings: list[list[tuple[int, float]]]) -> list[list[int]]:
    return [[i for i, _ in r] for r in rankings]


# Each fusion's parameter grid: RRF's k and BM25's weight against dense 1; relative score's dense
# weight (BM25's is 1 - it).
RRF_GRID = [(k, w) for k in (5, 10, 20, 30, 60, 100) for w in (1.0, 1.5, 2.0, 3.0, 4.0)]
RELATIVE_GRID = [round(0.05 * i, 2) for i in range(21)]


def fuse(method: str, param, lexical_run: list, dense_run: list) -> list[list[int]]:
    """Each query's fused ranking (ids) of one BM25 and one dense run."""
    if method == "rrf":
        k, w = param
        fused = [rrf([[i for i, _ in b], [i for i, _ in d]], k=k, weights=[w, 1.0])
                 for b, d in zip(lexical_run, dense_run, strict=True)]  # fmt: skip
    else:
        fused = [
            relative_score([b, d], [1 - param, param]) for b, d in zip(lexical_run, dense_run, strict=True)
        ]
    return ids_of(fused)


def cross_validated(method: str, grid: list, lexical_run: list, dense_run: list, relevant: list[set[int]]):
    """Two folds (even and odd chapters): the parameter with the best nDCG@10 on one fold ranks
    the other, so no query is scored by a parameter chosen on it. Returns (every query's
    ranking, the parameter each fold chose)."""
    return two_fold({param: fuse(method, param, lexical_run, dense_run) for param in grid}, relevant)


def two_fold(rankings: dict, relevant: list[set[int]]) -> tuple[list[list[int]], list]:
    """Every query ranked by the parameter (a key of `rankings`: {param: each query's ranking})
    that scores the best nDCG@10 on the other fold of chapters; and the two parameters chosen."""
    folds = [list(range(0, len(relevant), 2)), list(range(1, len(relevant), 2))]
    out: list[list[int]] = [[] for _ in relevant]
    chosen = []
    for tune, test in (folds, folds[::-1]):
        best = max(rankings, key=lambda p: np.mean([ndcg_at(rankings[p][q], relevant[q], 10) for q in tune]))
        chosen.append(best)
        for q in test:
            out[q] = rankings[best][q]
    return out, chosen


# Query expansion's grid: feedback chunks x terms x the original query's weight (RM3's fbDocs,
# fbTerms, originalQueryWeight); for hybrid also the dense weight of the second fusion.
EXPANSION_GRID = [(m, t, w) for m in (5, 10, 20, 30) for t in (5, 10, 20) for w in (0.3, 0.5, 0.7)]
SECOND_FUSION_WEIGHTS = (0.0, 0.1, 0.2, DENSE_WEIGHT)


def expanded_runs(index, queries: list[str], seeds: list, param) -> list[list[tuple[int, float]]]:
    """Each query's BM25 ranking with the query expanded by its seed ranking's best chunks."""
    chunks, terms, weight = param
    return [index.expanded_search(q, [i for i, _ in seed[:chunks]], DEPTH, terms=terms, original_weight=weight)
            for q, seed in zip(queries, seeds, strict=True)]  # fmt: skip


def cross_validated_expansion(index, queries, seeds, dense_run, relative):
    """As cross_validated, over EXPANSION_GRID (x SECOND_FUSION_WEIGHTS when `dense_run` is
    given: the expanded BM25 ranking fused again with it by relative score)."""
    fused = {}
    for param in EXPANSION_GRID:
        lexical_run = expanded_runs(index, queries, seeds, param)
        for weight in SECOND_FUSION_WEIGHTS if dense_run else (None,):
            fused[(*param, weight)] = (
                fuse("relative_score", weight, lexical_run, dense_run) if dense_run else ids_of(lexical_run)
            )
    return two_fold(fused, relative)


def quality(args: argparse.Namespace) -> dict:
    queries, texts, relevant = corpus(ChunkConfig(args.chunk_size, args.chunk_overlap))
    print(f"{len(queries)} queries, {len(texts)} chunks of {args.chunk_size} chars", file=sys.stderr)
    ids = np.arange(len(texts), dtype=np.int64)
    plain, stemmed = lexical.build(ids, texts, 0, stem=False), lexical.build(ids, texts, 0)
    print(f"BM25 stemmer: {stemmed.language}", file=sys.stderr)
    runs: dict[str, list[list[tuple[int, float]]]] = {
        "bm25, no stemming": [plain.search(q, DEPTH) for q in queries],
        "bm25": [stemmed.search(q, DEPTH) for q in queries],
    }
    runs["dense MiniLM"] = dense_rankings(MINILM, queries, texts, args.cache_dir)
    runs["dense e5"] = dense_rankings(E5, queries, texts, args.cache_dir)
    checkpoint = args.checkpoint or str(train_small_model(args.cache_dir / "semilla-model"))
    runs["dense semilla"] = dense_rankings(checkpoint, queries, texts, args.cache_dir)
    rows = {name: score(ids_of(r), relevant) for name, r in runs.items()}
    chosen: dict[str, list] = {}
    rows["hybrid bm25 (no stemming) + MiniLM, rrf k=60 (the old default)"] = score(
        fuse("rrf", (60, 1.0), runs["bm25, no stemming"], runs["dense MiniLM"]), relevant
    )
    for dense in ("dense MiniLM", "dense e5", "dense semilla"):
        tag = dense.split()[1]
        b, d = runs["bm25"], runs[dense]
        rows[f"hybrid bm25 + {tag}, rrf k=60"] = score(fuse("rrf", (60, 1.0), b, d), relevant)
        rows[f"hybrid bm25 + {tag}, relative_score, dense weight {DENSE_WEIGHT}"] = score(
            fuse("relative_score", DENSE_WEIGHT, b, d), relevant
        )
        for method, grid in (("rrf", RRF_GRID), ("relative_score", RELATIVE_GRID)):
            name = f"hybrid bm25 + {tag}, {method}, tuned on the other half"
            fused, chosen[name] = cross_validated(method, grid, b, d, relevant)
            rows[name] = score(fused, relevant)
    # query expansion (semilla.retrieval.lexical), at Anserini's RM3 defaults and cross-validated:
    # BM25 alone seeded by BM25; hybrid seeded by the first fusion, then fused again with dense,
    # as Collections.search(expand=True)
    defaults = (lexical.FEEDBACK_CHUNKS, lexical.FEEDBACK_TERMS, lexical.ORIGINAL_WEIGHT)
    bm25_expanded = expanded_runs(stemmed, queries, runs["bm25"], defaults)
    rows["bm25, expanded (RM3 at Anserini's defaults)"] = score(ids_of(bm25_expanded), relevant)
    name = "bm25, expanded, tuned on the other half"
    fused, chosen[name] = cross_validated_expansion(stemmed, queries, runs["bm25"], None, relevant)
    rows[name] = score(fused, relevant)
    for dense in ("dense MiniLM", "dense e5"):
        tag, d = dense.split()[1], runs[dense]
        first = [
            relative_score([b, x], [1 - DENSE_WEIGHT, DENSE_WEIGHT])
            for b, x in zip(runs["bm25"], d, strict=True)
        ]
        again = expanded_runs(stemmed, queries, first, defaults)
        rows[f"hybrid bm25 + {tag}, expanded (defaults), fused again"] = score(
            fuse("relative_score", DENSE_WEIGHT, again, d), relevant
        )
        name = f"hybrid bm25 + {tag}, expanded, tuned on the other half"
        fused, chosen[name] = cross_validated_expansion(stemmed, queries, first, d, relevant)
        rows[name] = score(fused, relevant)
    print("\n| run | recall@5 | nDCG@10 |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['recall@5']:.3f} | {r['ndcg@10']:.3f} |")
    for name, params in chosen.items():
        print(f"{name}: parameters chosen on the even / odd chapters: {params}")
    for tag in ("MiniLM", "e5"):
        best_single = max(rows["bm25"]["ndcg@10"], rows[f"dense {tag}"]["ndcg@10"])
        default = rows[f"hybrid bm25 + {tag}, relative_score, dense weight {DENSE_WEIGHT}"]["ndcg@10"]
        print(
            f"hybrid bm25 + {tag} (defaults) - the better alone = {default - best_single:+.3f} nDCG@10 (target >= +0.02)"
        )
        expanded = rows[f"hybrid bm25 + {tag}, expanded, tuned on the other half"]["ndcg@10"]
        print(
            f"hybrid bm25 + {tag} expanded (cross-validated) - the better alone = {expanded - best_single:+.3f};"
            f" - bm25 expanded (cross-validated) = {expanded - rows['bm25, expanded, tuned on the other half']['ndcg@10']:+.3f}"
        )
    return {"queries": len(queries), "chunks": len(texts), "chunk_size": args.chunk_size,
            "checkpoint": checkpoint, "runs": rows, "chosen": chosen}  # fmt: skip


# --- FAISS at 100k ---------------------------------------------------------------------------


def synthetic_vectors(n: int, dim: int, seed: int = 0, kind: str = "latent") -> np.ndarray:
    """Unit vectors. `latent`: a random 48-dimensional subspace plus a little noise, as sentence
    embeddings have a low intrinsic dimension. `clusters`: 1000 random centres plus strong
    isotropic noise, so each vector's ~100 cluster mates are all at nearly the same distance (a
    worst case for approximate search: the true top 10 is decided by noise)."""
    rng = np.random.default_rng(0)  # the same space for data and queries
    if kind == "latent":
        basis = rng.standard_normal((48, dim)).astype(np.float32)
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal((n, 48)).astype(np.float32) @ basis
        x += 0.1 * np.sqrt(48) * rng.standard_normal((n, dim)).astype(np.float32)
    else:
        centres = rng.standard_normal((1000, dim)).astype(np.float32)
        rng = np.random.default_rng(seed + 1)
        x = centres[rng.integers(0, 1000, n)] + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def latencies_ms(search, queries: np.ndarray) -> dict[str, float]:
    times = []
    for q in queries:
        start = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def ann(args: argparse.Namespace) -> dict:
    import faiss

    dim, out = 384, {}
    data = synthetic_vectors(args.size, dim, kind=args.data)
    queries = synthetic_vectors(args.queries, dim, seed=1, kind=args.data)
    ids = np.arange(args.size, dtype=np.int64)
    for n in (10_000, 50_000, 100_000, 200_000):
        if n > args.size:
            break
        flat = vector_index.build(ids[:n], data[:n], dim, 0)
        out[f"exact {n}"] = latencies_ms(lambda q, f=flat: f.search(q, 10), queries)
        print(f"exact, {n} vectors: {out[f'exact {n}']}", file=sys.stderr)
    exact = vector_index.build(ids, data, dim, 0)
    truth = [[i for i, _ in exact.search(q, 10)] for q in queries]
    start = time.perf_counter()
    inner = faiss.IndexHNSWFlat(dim, vector_index.HNSW_M, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efConstruction = vector_index.HNSW_EF_CONSTRUCTION
    hnsw = faiss.IndexIDMap2(inner)
    faiss.omp_set_num_threads(2)  # building is batched work: both cores help
    hnsw.add_with_ids(data, ids)
    faiss.omp_set_num_threads(1)
    out["hnsw build_s"] = time.perf_counter() - start
    print(
        f"HNSW (M={vector_index.HNSW_M}), {args.size} vectors: built in {out['hnsw build_s']:.0f} s",
        file=sys.stderr,
    )
    for ef in (32, 64, 128, 256, 512):
        params = faiss.SearchParametersHNSW(efSearch=ef)

        def search(q, p=params):
            return hnsw.search(q.reshape(1, -1), 10, params=p)[1][0]

        found = [search(q) for q in queries]
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        out[f"hnsw efSearch={ef}"] = {**latencies_ms(search, queries), "recall@10_vs_exact": recall}
        print(f"HNSW efSearch={ef}: {out[f'hnsw efSearch={ef}']}", file=sys.stderr)
    return out


def collection(args: argparse.Namespace) -> dict:
    """Collections.search on a collection of `size` chunks: real Quijote chunk texts (repeated) in
    the database, synthetic vectors; the query's embedding is timed apart (MiniLM)."""
    from sqlalchemy import insert

    from semilla.retrieval.collections import Collections, Viewer
    from semilla.retrieval.tables import ChunkRow, CollectionRow, DocumentRow, vector_bytes
    from semilla.serve.accounts.db import make_engine
    from semilla.serve.accounts.migrate import migrate

    dim = 384
    queries, texts, _ = corpus(ChunkConfig())
    vectors = synthetic_vectors(args.size, dim)

    class Synthetic:
        name, max_tokens = "synthetic", 256

        def __init__(self):
            self.dim = dim

        def embed(self, items: list[str]) -> np.ndarray:
            return synthetic_vectors(len(items), dim, seed=hash(items[0]) % 1000)

        embed_query = embed

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/bench.db")
        migrate(engine)
        books = Collections(engine, Path(tmp) / "indexes", embedder=lambda name: Synthetic())
        row = books.create("big", Viewer())
        with engine.begin() as c:
            c.execute(insert(DocumentRow), [{"id": 1, "collection_id": row.id, "doc_id": "all", "content_hash": "x",
                                             "meta": "{}", "chars": 0}])  # fmt: skip
            c.execute(insert(ChunkRow), [{"collection_id": row.id, "document_id": 1, "position": i,
                                          "text": texts[i % len(texts)], "vector": vector_bytes(vectors[i])}
                                         for i in range(args.size)])  # fmt: skip
            c.execute(CollectionRow.__table__.update().values(version=1))
        start = time.perf_counter()
        books.vector_index(row)
        books.lexical_index(row)
        build_s = time.perf_counter() - start
        out = {"size": args.size, "first search build_s": build_s}
        # the modes take turns on each query, so a change in the shared machine's load in the
        # middle of the run weighs on all of them alike
        modes = {"hybrid": ("hybrid", False), "dense": ("dense", False), "bm25": ("bm25", False),
                 "hybrid, expanded": ("hybrid", True), "bm25, expanded": ("bm25", True)}  # fmt: skip
        start = time.perf_counter()
        books.search(row, queries[0], k=10, expand=True)  # makes the chunks' term lists, once
        out["expansion's first search s"] = time.perf_counter() - start
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(3):
            for q in queries:
                for name, spent in times.items():
                    mode, expand = modes[name]
                    start = time.perf_counter()
                    books.search(row, q, k=10, mode=mode, expand=expand)
                    spent.append((time.perf_counter() - start) * 1000)
        for mode, spent in times.items():
            out[mode] = {"p50_ms": float(np.percentile(spent, 50)), "p95_ms": float(np.percentile(spent, 95))}
            print(f"{mode}, {args.size} chunks: {out[mode]}", file=sys.stderr)
    minilm = load_embedder(MINILM)
    out["MiniLM query embedding"] = latencies_ms(lambda q: minilm.embed([q]), queries)
    print(f"MiniLM query embedding: {out['MiniLM query embedding']}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--checkpoint", help="a semilla checkpoint for the dense run (default: train a small one)")
    q.add_argument("--chunk-size", type=int, default=1000)
    q.add_argument("--chunk-overlap", type=int, default=100)
    q.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "semilla" / "bench-retrieval")
    a = sub.add_parser("ann")
    a.add_argument("--size", type=int, default=100_000)
    a.add_argument("--queries", type=int, default=500)
    a.add_argument(
        "--data",
        choices=("latent", "clusters"),
        default="latent",
        help="synthetic vectors (see synthetic_vectors)",
    )
    c = sub.add_parser("collection")
    c.add_argument("--size", type=int, default=100_000)
    args = parser.parse_args()
    result = {"quality": quality, "ann": ann, "collection": collection}[args.part](args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"retrieval_{args.part}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
