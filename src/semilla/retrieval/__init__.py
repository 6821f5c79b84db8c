"""Embeddings, document collections and hybrid search (the `retrieval` extra).

embedders   text -> unit vectors (all-MiniLM-L6-v2, semilla checkpoints)
chunking    documents -> overlapping chunks; the content hash that deduplicates
tables      the database rows (the truth): collections, documents, chunks with vectors
vector_index FAISS (exact, HNSW for large collections), a file cache of the database
lexical     BM25 (bm25s, Snowball stemming), rebuilt in memory
fusion      reciprocal rank fusion, relative score fusion
collections create / add / delete / search, with ownership
files       uploaded files -> text
"""
