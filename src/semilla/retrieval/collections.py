"""Named document collections: add, delete, hybrid search. The database is the truth.

    books = Collections(engine, Path("semilla-data/collections"))
    c = books.create("quijote", Viewer(user_id=1))
    books.add(c, [NewDocument("En un lugar de la Mancha...", doc_id="cap1", metadata={"parte": 1})])
    books.search(c, "molinos de viento", k=4, filter={"parte": 1})

An add is acknowledged once its documents, chunks and vectors are committed in one
transaction; the FAISS file and the BM25 index are caches rebuilt from the database when they
are missing, damaged or older than the collection's `version`.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from semilla.errors import SemillaError
from semilla.retrieval import lexical, vector_index
from semilla.retrieval.chunking import ChunkConfig, chunk_text, content_hash
from semilla.retrieval.embedders import MINILM, Embedder, check_unicode, load_embedder
from semilla.retrieval.fusion import DENSE_WEIGHT, FUSIONS, RRF_K, relative_score, rrf
from semilla.retrieval.tables import ChunkRow, CollectionRow, DocumentRow, vector_bytes, vectors_from_bytes

log = logging.getLogger(__name__)

MODES = ("hybrid", "dense", "bm25")
MAX_K = 100
CANDIDATES = 50  # per ranking fused: deeper than k so a chunk found by one side still counts


class NotFound(SemillaError):
    """No such collection or document for this caller (another user's collection included)."""


class Conflict(SemillaError):
    """The name or document id is taken."""


class Forbidden(SemillaError):
    """The caller can read the collection but not change it (shared by someone else)."""


@dataclass(frozen=True)
class Viewer:
    """Who asks: an account (user_id) or nobody (None: the CLI's and an open server's own)."""

    user_id: int | None = None
    admin: bool = False


@dataclass
class NewDocument:
    text: str
    doc_id: str | None = None  # a fresh id when None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class AddResult:
    added: list[str]  # document ids
    duplicates: list[str]  # ids of documents already there with the same content
    chunks: int


@dataclass
class SearchHit:
    document_id: str
    chunk: int  # the chunk's position in its document
    score: float  # fused (hybrid), cosine (dense) or BM25 score
    text: str
    metadata: dict[str, Any]


@dataclass
class CollectionInfo:
    name: str
    owner_id: int | None
    shared: bool
    embedder: str
    dim: int
    chunk_size: int
    chunk_overlap: int
    documents: int
    chunks: int
    created_at: int  # unix time

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def check_document(doc: NewDocument, where: str) -> None:
    """One line naming the first problem with a document, raised as SemillaError."""
    if not isinstance(doc.text, str):
        raise SemillaError(f"{where}: text must be a string")
    if "\x00" in doc.text:
        raise SemillaError(f"{where}: the text contains NUL bytes (binary data is not a document)")
    if not doc.text.strip():
        raise SemillaError(f"{where}: the text is empty")
    if doc.doc_id is not None and not (isinstance(doc.doc_id, str) and 0 < len(doc.doc_id) <= 200):
        raise SemillaError(f"{where}: id must be a string of 1 to 200 characters")
    if not isinstance(doc.metadata, dict):
        raise SemillaError(f"{where}: metadata must be an object")
    for key, value in doc.metadata.items():
        if not isinstance(value, str | int | float | bool) or value is None:
            raise SemillaError(f"{where}: metadata[{key!r}] must be a string, number or boolean")
    strings = [
        doc.text,
        doc.doc_id or "",
        *doc.metadata,
        *(v for v in doc.metadata.values() if isinstance(v, str)),
    ]
    check_unicode(strings, f"{where}: text, id or metadata")


def valid_name(name: str) -> bool:
    """1-100 letters, digits, '-', '_' or '.'."""
    return 0 < len(name) <= 100 and name.replace("-", "").replace("_", "").replace(".", "").isalnum()


def matches(metadata: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Equality on every key; a list of values means any of them."""
    for key, value in wanted.items():
        options = value if isinstance(value, list) else [value]
        if key not in metadata or metadata[key] not in options:
            return False
    return True


def fuse(
    dense: list[tuple[int, float]] | None, bm25: list[tuple[int, float]] | None, fusion: str
) -> list[tuple[int, float]]:
    """The one ranking given, or both fused by `fusion` (see semilla.retrieval.fusion)."""
    if dense is None or bm25 is None:
        return dense if bm25 is None else bm25
    if fusion == "rrf":
        return rrf([[i for i, _ in dense], [i for i, _ in bm25]], k=RRF_K)
    return relative_score([dense, bm25], [DENSE_WEIGHT, 1 - DENSE_WEIGHT])


class Collections:
    """The collections of one database; `index_dir` holds the FAISS files (caches)."""

    def __init__(self, engine: Engine, index_dir: Path, embedder: Callable[[str], Embedder] = load_embedder):
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(write=True), expire_on_commit=False)
        self.embedder = embedder
        self._vectors: dict[int, vector_index.VectorIndex] = {}
        self._lexical: dict[int, lexical.LexicalIndex] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, collection_id: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(collection_id, threading.Lock())

    # --- collections ----------------------------------------------------------------------

    def create(
        self,
        name: str,
        viewer: Viewer,
        embedder: str = MINILM,
        chunking: ChunkConfig | None = None,
    ) -> CollectionRow:
        """A new empty collection owned by `viewer`; Conflict if they already have one so named."""
        if not valid_name(name):
            raise SemillaError(f"collection name {name!r}: use 1-100 letters, digits, '-', '_' or '.'")
        chunking = (chunking or ChunkConfig()).validate()
        dim = self.embedder(embedder).dim
        with self._write() as s, s.begin():
            if s.scalar(
                select(CollectionRow.id).where(*self._owned_by(viewer.user_id), CollectionRow.name == name)
            ):
                raise Conflict(f"collection {name!r} already exists")
            row = CollectionRow(name=name, owner_id=viewer.user_id, shared=False, embedder=embedder, dim=dim,
                                chunk_size=chunking.size, chunk_overlap=chunking.overlap, version=0)  # fmt: skip
            s.add(row)
        return row

    @staticmethod
    def _owned_by(user_id: int | None) -> list:
        return [CollectionRow.owner_id.is_(None) if user_id is None else CollectionRow.owner_id == user_id]

    def _visible(self, viewer: Viewer) -> list:
        if viewer.admin:
            return []
        return [(self._owned_by(viewer.user_id)[0]) | CollectionRow.shared.is_(True)]

    def get(self, name: str, viewer: Viewer, write: bool = False) -> CollectionRow:
        """The collection `name` as `viewer` sees it: their own first, then shared ones.

        Another user's private collection is NotFound (its existence is not revealed);
        changing a shared collection one does not own is Forbidden."""
        if not valid_name(name):  # no such name can have been created
            raise NotFound(f"collection {name!r} does not exist")
        with self._read() as s:
            rows = s.scalars(
                select(CollectionRow)
                .where(CollectionRow.name == name, *self._visible(viewer))
                .order_by(CollectionRow.id)
            ).all()
        if not rows:
            raise NotFound(f"collection {name!r} does not exist")
        own = [r for r in rows if r.owner_id == viewer.user_id]
        row = own[0] if own else rows[0]
        if write and not own and not viewer.admin:
            raise Forbidden(f"collection {name!r} is shared with you read-only")
        return row

    def list(self, viewer: Viewer) -> list[CollectionInfo]:
        with self._read() as s:
            rows = s.scalars(
                select(CollectionRow).where(*self._visible(viewer)).order_by(CollectionRow.name)
            ).all()
            return [self._info(s, r) for r in rows]

    def info(self, row: CollectionRow) -> CollectionInfo:
        with self._read() as s:
            return self._info(s, row)

    @staticmethod
    def _info(s: Session, row: CollectionRow) -> CollectionInfo:
        docs = s.scalar(select(func.count()).where(DocumentRow.collection_id == row.id))
        chunks = s.scalar(select(func.count()).where(ChunkRow.collection_id == row.id))
        return CollectionInfo(row.name, row.owner_id, row.shared, row.embedder, row.dim, row.chunk_size,
                              row.chunk_overlap, docs or 0, chunks or 0, int(row.created_at.timestamp()))  # fmt: skip

    def share(self, row: CollectionRow, shared: bool) -> None:
        with self._write() as s, s.begin():
            s.execute(update(CollectionRow).where(CollectionRow.id == row.id).values(shared=shared))

    def drop(self, row: CollectionRow) -> None:
        """Delete the collection, its documents, chunks and index files."""
        with self._lock(row.id), self._write() as s, s.begin():
            s.execute(delete(ChunkRow).where(ChunkRow.collection_id == row.id))
            s.execute(delete(DocumentRow).where(DocumentRow.collection_id == row.id))
            s.execute(delete(CollectionRow).where(CollectionRow.id == row.id))
        self._forget(row.id)
        for path in (self._index_path(row.id), self._index_path(row.id).with_suffix(".json")):
            path.unlink(missing_ok=True)

    # --- documents ------------------------------------------------------------------------

    def add(
        self, row: CollectionRow, docs: list[NewDocument], progress: Callable[[int], None] | None = None
    ) -> AddResult:
        """Chunk, embed and store `docs` in one transaction; the same content twice is stored once.

        `progress(n)` is called as each batch of n chunks is embedded."""
        for i, doc in enumerate(docs):
            check_document(doc, doc.doc_id or f"document {i}")
        cfg = ChunkConfig(row.chunk_size, row.chunk_overlap)
        embedder = self.embedder(row.embedder)
        with self._lock(row.id):
            with self._read() as s:
                known = dict(s.execute(select(DocumentRow.content_hash, DocumentRow.doc_id)
                                       .where(DocumentRow.collection_id == row.id)).all())  # fmt: skip
                taken = set(s.scalars(select(DocumentRow.doc_id).where(DocumentRow.collection_id == row.id)))
            fresh, duplicates = [], []
            for doc in docs:
                digest = content_hash(doc.text)
                if digest in known:
                    duplicates.append(known[digest])
                    continue
                doc_id = doc.doc_id or uuid.uuid4().hex
                if doc_id in taken:
                    raise Conflict(f"document id {doc_id!r} already holds other content; delete it first")
                known[digest] = doc_id
                taken.add(doc_id)
                fresh.append((doc_id, digest, doc, chunk_text(doc.text, cfg)))
            texts = [c for *_, chunks in fresh for c in chunks]
            vectors = np.zeros((0, row.dim), np.float32)
            if texts:
                parts = []
                for start in range(0, len(texts), 256):
                    parts.append(embedder.embed(texts[start : start + 256]))
                    if progress:
                        progress(len(parts[-1]))
                vectors = np.concatenate(parts)
            try:
                new_ids, version = self._store(row, fresh, vectors)
            except IntegrityError:  # another process added one of these ids meanwhile
                raise Conflict("a document id was taken while adding; nothing was added, try again") from None
            self._after_add(row, new_ids, vectors, version)
        return AddResult([f[0] for f in fresh], duplicates, len(texts))

    def _store(self, row: CollectionRow, fresh: list, vectors: np.ndarray) -> tuple[np.ndarray, int]:
        with self._write() as s, s.begin():
            version = s.scalar(select(CollectionRow.version).where(CollectionRow.id == row.id))
            if version is None:
                raise NotFound(f"collection {row.name!r} does not exist")
            chunk_rows, at = [], 0
            for doc_id, digest, doc, chunks in fresh:
                doc_row = DocumentRow(collection_id=row.id, doc_id=doc_id, content_hash=digest,
                                      meta=json.dumps(doc.metadata, ensure_ascii=False), chars=len(doc.text))  # fmt: skip
                s.add(doc_row)
                s.flush()
                for position, text in enumerate(chunks):
                    chunk = ChunkRow(collection_id=row.id, document_id=doc_row.id, position=position, text=text,
                                     vector=vector_bytes(vectors[at]))  # fmt: skip
                    chunk_rows.append(chunk)
                    at += 1
            s.add_all(chunk_rows)
            s.flush()
            if fresh:
                version += 1
                s.execute(update(CollectionRow).where(CollectionRow.id == row.id).values(version=version))
        return np.array([c.id for c in chunk_rows], np.int64), version

    def _after_add(self, row: CollectionRow, ids: np.ndarray, vectors: np.ndarray, version: int) -> None:
        """Extend a current in-memory vector index and save it; BM25 is rebuilt at the next search."""
        if not len(ids):
            return
        self._lexical.pop(row.id, None)
        cached = self._vectors.get(row.id)
        grows_past_exact = (
            cached is not None and cached.exact and cached.size + len(ids) >= vector_index.HNSW_FROM
        )
        if cached is None or cached.version != version - 1 or grows_past_exact:
            self._vectors.pop(row.id, None)
            return
        cached.add(ids, vectors)
        cached.version = version
        vector_index.save(cached, self._index_path(row.id))

    def delete_document(self, row: CollectionRow, doc_id: str) -> None:
        with self._lock(row.id), self._write() as s, s.begin():
            pk = s.scalar(
                select(DocumentRow.id).where(
                    DocumentRow.collection_id == row.id, DocumentRow.doc_id == doc_id
                )
            )
            if pk is None:
                raise NotFound(f"document {doc_id!r} is not in collection {row.name!r}")
            s.execute(delete(ChunkRow).where(ChunkRow.document_id == pk))
            s.execute(delete(DocumentRow).where(DocumentRow.id == pk))
            s.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id)
                .values(version=CollectionRow.version + 1)
            )
        self._forget(row.id)

    def _forget(self, collection_id: int) -> None:
        self._vectors.pop(collection_id, None)
        self._lexical.pop(collection_id, None)

    # --- indexes --------------------------------------------------------------------------

    def _index_path(self, collection_id: int) -> Path:
        return self.index_dir / f"{collection_id}.faiss"

    def _version(self, s: Session, row: CollectionRow) -> int:
        """The collection's version in the database (one indexed row: cheap on every search)."""
        version = s.scalar(select(CollectionRow.version).where(CollectionRow.id == row.id))
        if version is None:
            raise NotFound(f"collection {row.name!r} does not exist")
        return version

    def vector_index(self, row: CollectionRow) -> vector_index.VectorIndex:
        """The collection's FAISS index at the database's version: memory, file, or rebuilt."""
        with self._lock(row.id), self._read() as s:
            version = self._version(s, row)
            cached = self._vectors.get(row.id)
            if cached is not None and cached.version == version:
                return cached
            path = self._index_path(row.id)
            size = s.scalar(select(func.count()).where(ChunkRow.collection_id == row.id)) or 0
            index = vector_index.load(path, version, size)
            if index is None:
                ids, blobs = self._column(s, row, ChunkRow.vector)
                index = vector_index.build(ids, vectors_from_bytes(blobs, row.dim), row.dim, version)
                vector_index.save(index, path)
            self._vectors[row.id] = index
            return index

    def lexical_index(self, row: CollectionRow) -> lexical.LexicalIndex:
        with self._lock(row.id), self._read() as s:
            version = self._version(s, row)
            cached = self._lexical.get(row.id)
            if cached is None or cached.version != version:
                ids, texts = self._column(s, row, ChunkRow.text)
                cached = self._lexical[row.id] = lexical.build(ids, texts, version)
            return cached

    @staticmethod
    def _column(s: Session, row: CollectionRow, column) -> tuple[np.ndarray, list]:
        pairs = s.execute(
            select(ChunkRow.id, column).where(ChunkRow.collection_id == row.id).order_by(ChunkRow.id)
        ).all()
        return np.array([p[0] for p in pairs], np.int64), [p[1] for p in pairs]

    # --- search ---------------------------------------------------------------------------

    def search(
        self,
        row: CollectionRow,
        query: str,
        k: int = 4,
        mode: str = "hybrid",
        filter: dict[str, Any] | None = None,
        fusion: str = FUSIONS[0],
        expand: bool = False,
    ) -> list[SearchHit]:
        """The k chunks that best answer `query`: BM25 and dense rankings fused (hybrid; see
        semilla.retrieval.fusion), or one of them; only chunks of documents whose metadata
        matches `filter`. `expand` (bm25 and hybrid): BM25 searches again with the query expanded
        by the terms of the first answer's best chunks (semilla.retrieval.lexical), then fuses again."""
        if mode not in MODES:
            raise SemillaError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if fusion not in FUSIONS:
            raise SemillaError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if expand and mode == "dense":
            raise SemillaError("expand needs mode bm25 or hybrid: it expands the BM25 query")
        if not isinstance(query, str) or not query.strip():
            raise SemillaError("query must be a non-empty string")
        check_unicode([query], "query")
        if not 1 <= k <= MAX_K:
            raise SemillaError(f"k must be in [1, {MAX_K}], got {k}")
        allowed = self._allowed(row, filter) if filter else None
        if allowed is not None and not len(allowed):
            return []
        depth = max(k, CANDIDATES)
        dense: list[tuple[int, float]] | None = None
        if mode in ("hybrid", "dense"):
            vector = self.embedder(row.embedder).embed_query([query])[0]
            dense = self.vector_index(row).search(vector, depth, allowed)
        words = self.lexical_index(row) if mode != "dense" else None
        bm25 = words.search(query, depth, allowed) if words is not None else None
        best = fuse(dense, bm25, fusion)
        if expand:
            feedback = [i for i, _ in best[: lexical.FEEDBACK_CHUNKS]]
            bm25 = words.expanded_search(query, feedback, depth, allowed)
            best = fuse(dense, bm25, fusion)
        return self._hits(best[:k])

    def _allowed(self, row: CollectionRow, wanted: dict[str, Any]) -> np.ndarray:
        with self._read() as s:
            docs = s.execute(
                select(DocumentRow.id, DocumentRow.meta).where(DocumentRow.collection_id == row.id)
            ).all()
            keep = [pk for pk, meta in docs if matches(json.loads(meta), wanted)]
            ids = s.scalars(select(ChunkRow.id).where(ChunkRow.document_id.in_(keep))) if keep else []
            return np.array(list(ids), np.int64)

    def _hits(self, best: list[tuple[int, float]]) -> list[SearchHit]:
        if not best:
            return []
        with self._read() as s:
            rows = s.execute(
                select(ChunkRow.id, ChunkRow.position, ChunkRow.text, DocumentRow.doc_id, DocumentRow.meta)
                .join(DocumentRow, DocumentRow.id == ChunkRow.document_id)
                .where(ChunkRow.id.in_([i for i, _ in best]))
            ).all()
        found = {r[0]: r for r in rows}
        return [
            SearchHit(found[i][3], found[i][1], score, found[i][2], json.loads(found[i][4]))
            for i, score in best
            if i in found  # a chunk deleted between the two reads is skipped
        ]
