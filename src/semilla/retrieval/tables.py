"""The database tables of collections: the truth that FAISS and BM25 indexes are rebuilt from.

collections 1-n documents 1-n chunks; a chunk's row id is its id in the FAISS index and its
vector is stored with it (float32 bytes, never pickle), so an index can be rebuilt without
embedding again. The tables live in the server's database (Alembic revision 0004).
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class RetrievalBase(DeclarativeBase):
    pass


class CollectionRow(RetrievalBase):
    __tablename__ = "collections"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    owner_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # None: open mode/CLI
    shared: Mapped[bool] = mapped_column(Boolean, default=False)  # readable by every user (admin sets it)
    embedder: Mapped[str] = mapped_column(String(500))  # all-MiniLM-L6-v2, a served model or a checkpoint
    dim: Mapped[int] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    chunk_overlap: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, default=0)  # +1 on every change: stale indexes see it
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class DocumentRow(RetrievalBase):
    __tablename__ = "collection_documents"
    __table_args__ = (UniqueConstraint("collection_id", "doc_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    doc_id: Mapped[str] = mapped_column(String(200))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    meta: Mapped[str] = mapped_column(Text, default="{}")  # JSON object
    chars: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ChunkRow(RetrievalBase):
    __tablename__ = "collection_chunks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("collection_documents.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)  # the chunk's place in its document
    text: Mapped[str] = mapped_column(Text)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, `dim` values


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vectors_from_bytes(blobs: list[bytes], dim: int) -> np.ndarray:
    """(N, dim) float32 from stored blobs."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)
