"""Collections on a real SQLite database: chunking, dedup, filters, ownership, and indexes that
are only caches of the database."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from semilla.errors import SemillaError
from semilla.retrieval import lexical
from semilla.retrieval.chunking import ChunkConfig, chunk_text
from semilla.retrieval.collections import Collections, Conflict, Forbidden, NewDocument, NotFound, Viewer
from semilla.retrieval.fusion import relative_score, rrf
from semilla.serve.accounts.db import make_engine
from semilla.serve.accounts.migrate import migrate

DOCS = [
    NewDocument(
        "Don Quijote atacó los molinos de viento creyendo que eran gigantes.", "molinos", {"parte": 1}
    ),
    NewDocument("Sancho Panza gobernó la ínsula Barataria con buen juicio.", "insula", {"parte": 2}),
    NewDocument(
        "Dulcinea del Toboso era la dama de los pensamientos del caballero.", "dulcinea", {"parte": 1}
    ),
]


@pytest.fixture
def engine(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'semilla.db'}")
    migrate(engine)
    return engine


@pytest.fixture
def books(engine, tmp_path: Path) -> Collections:
    return Collections(engine, tmp_path / "collections")


def test_chunks_cover_the_text_with_the_overlap_asked():
    text = " ".join(f"palabra{i}" for i in range(400))
    chunks = chunk_text(text, ChunkConfig(200, 40))
    assert all(len(c) <= 200 for c in chunks)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b[:20] in a  # each chunk starts inside the one before: the overlap
    words = set(text.split())
    assert words == set(" ".join(chunks).split())
    with pytest.raises(SemillaError, match="overlap"):
        ChunkConfig(100, 100).validate()


def test_rrf_prefers_what_both_rankings_found():
    assert [i for i, _ in rrf([[1, 2, 3], [3, 4, 1]])][:2] == [1, 3]


def test_relative_score_keeps_how_far_ahead_a_hit_is():
    bm25 = [(7, 12.0), (3, 5.5), (5, 5.0)]  # 7 far ahead of 3 and 5
    dense = [(9, 0.80), (3, 0.60), (5, 0.40)]
    scores = dict(relative_score([bm25, dense], [0.6, 0.4]))
    assert scores == pytest.approx({7: 0.6, 9: 0.4, 3: 0.6 * (0.5 / 7) + 0.4 * 0.5, 5: 0.0})
    assert relative_score([bm25, dense], [0.6, 0.4])[0][0] == 7
    # RRF sees only ranks: 3, second in both lists, beats 7, first in one
    assert rrf([[i for i, _ in bm25], [i for i, _ in dense]])[0][0] == 3
    assert dict(relative_score([[(1, 2.0), (2, 2.0)], []], [1.0, 1.0])) == {1: 1.0, 2: 1.0}


def test_bm25_stems_in_the_language_of_the_collection():
    assert lexical.detect_language([DOCS[0].text, DOCS[1].text]) == "spanish"
    assert (
        lexical.detect_language(["The windmills were giants to the knight of the sad figure."]) == "english"
    )
    assert lexical.detect_language(["Der Ritter kämpfte gegen Windmühlen"]) is None  # neither: no stemmer
    texts = ["Los molinos giraban.", "Un caballero andante.", "Gigantes en el camino."]
    ids = np.arange(3, dtype=np.int64)
    stemmed, plain = lexical.build(ids, texts, 0), lexical.build(ids, texts, 0, stem=False)
    assert stemmed.language == "spanish"
    assert [i for i, _ in stemmed.search("molino", 3)] == [0]  # "molinos" and "molino" share a stem
    assert plain.search("molino", 3) == []


def test_expansion_finds_chunks_that_share_the_best_hits_terms_not_the_querys():
    texts = [
        "Los molinos de viento giraban cerca de Rocinante y de Clavileño.",
        "Rocinante y Clavileño descansaban en el establo de la venta.",
        "Sancho comía pan y queso a la sombra de una encina.",
        "Dulcinea esperaba carta de su caballero en el Toboso.",
    ]
    index = lexical.build(np.arange(10, 14, dtype=np.int64), texts, 0)  # ids are not positions
    assert [i for i, _ in index.search("molinos", 4)] == [10]
    # with no feedback the expanded search is BM25 itself, scaled by the query's weight
    plain = index.search("molinos de viento", 4)
    alone = index.expanded_search("molinos de viento", [], 4)
    assert [i for i, _ in alone] == [i for i, _ in plain]
    words = len(lexical.tokenize(["molinos de viento"], lexical.stemmer_for(index.language))[0])
    assert [s for _, s in alone] == pytest.approx([lexical.ORIGINAL_WEIGHT / words * s for _, s in plain])
    terms = index.feedback_terms([10])
    assert sum(terms.values()) == pytest.approx(1.0) and len(terms) <= lexical.FEEDBACK_TERMS
    vocab = {i: t for t, i in index.retriever.vocab_dict.items()}
    names = lexical.tokenize(["Rocinante Clavileño"], lexical.stemmer_for(index.language))[0]
    assert set(names) <= {vocab[t] for t in terms}  # the hit's own words, stemmed
    expanded = index.expanded_search("molinos", [10], 4)
    assert [i for i, _ in expanded] == [10, 11]  # 11 shares Rocinante and Clavileño, not "molinos"
    assert [i for i, _ in index.expanded_search("molinos", [10], 4, allowed=np.array([10, 12]))] == [10]
    assert index.feedback_terms([99]) == {}  # an id that is not in the index adds nothing


def test_add_search_dedup_filter_and_delete(books: Collections):
    c = books.create("libros", Viewer())
    added = books.add(c, DOCS)
    assert added.added == ["molinos", "insula", "dulcinea"] and added.chunks == 3
    again = books.add(c, [NewDocument(DOCS[0].text, "otra-id")])  # same content: stored once
    assert again.added == [] and again.duplicates == ["molinos"]
    for mode in ("hybrid", "dense", "bm25"):
        assert books.search(c, "gigantes y molinos", k=1, mode=mode)[0].document_id == "molinos"
    assert books.search(c, "gigantes y molinos", k=1, fusion="rrf")[0].document_id == "molinos"
    with pytest.raises(SemillaError, match="fusion must be one of relative_score, rrf"):
        books.search(c, "molinos", fusion="max")
    for mode in ("hybrid", "bm25"):
        assert books.search(c, "gigantes y molinos", k=1, mode=mode, expand=True)[0].document_id == "molinos"
    with pytest.raises(SemillaError, match="expand needs mode bm25 or hybrid"):
        books.search(c, "molinos", mode="dense", expand=True)
    hits = books.search(c, "la dama del caballero", k=3, filter={"parte": 2})
    assert [h.document_id for h in hits] == ["insula"]
    assert books.search(c, "molinos", filter={"parte": 9}) == []
    with pytest.raises(Conflict, match="insula"):
        books.add(c, [NewDocument("otro texto distinto", "insula")])
    books.delete_document(c, "molinos")
    assert "molinos" not in {h.document_id for h in books.search(c, "molinos de viento", k=3)}
    assert books.info(c).documents == 2 and books.info(c).chunks == 2
    with pytest.raises(NotFound):
        books.delete_document(c, "molinos")


def test_a_multilingual_e5_collection_searches_with_query_vectors(books: Collections):
    from semilla.retrieval.embedders import E5, load_embedder

    c = books.create("multilingue", Viewer(), embedder=E5)
    books.add(c, DOCS)
    hit = books.search(c, "¿Quién luchó contra los molinos?", k=1, mode="dense")[0]
    assert hit.document_id == "molinos"
    emb = load_embedder(E5)
    # the dense score is the query's "query: " vector against the chunk's "passage: " vector
    expected = float(emb.embed_query(["¿Quién luchó contra los molinos?"])[0] @ emb.embed([DOCS[0].text])[0])
    assert hit.score == pytest.approx(expected, abs=1e-5)


def test_a_bad_document_adds_nothing(books: Collections):
    c = books.create("libros", Viewer())
    with pytest.raises(SemillaError, match="NUL"):
        books.add(c, [DOCS[0], NewDocument("texto\x00binario", "malo")])
    with pytest.raises(SemillaError, match="empty"):
        books.add(c, [NewDocument("   ")])
    assert books.info(c).documents == 0


def test_owners_see_their_own_others_get_not_found(books: Collections):
    ana, bea, admin = Viewer(1), Viewer(2), Viewer(3, admin=True)
    c = books.create("privada", ana)
    books.add(c, DOCS[:1])
    with pytest.raises(NotFound):
        books.get("privada", bea)
    assert [i.name for i in books.list(bea)] == []
    assert books.get("privada", admin).id == c.id
    books.share(c, True)
    assert books.search(books.get("privada", bea), "molinos")[0].document_id == "molinos"
    with pytest.raises(Forbidden):
        books.get("privada", bea, write=True)
    books.create("privada", bea)  # the same name is free for another owner
    assert books.get("privada", bea).owner_id == 2


def test_a_damaged_index_file_is_rebuilt_from_the_database(
    books: Collections, engine, tmp_path: Path, caplog
):
    c = books.create("libros", Viewer())
    books.add(c, DOCS)
    before = [(h.document_id, round(h.score, 6)) for h in books.search(c, "molinos", mode="dense")]
    index_file = tmp_path / "collections" / f"{c.id}.faiss"
    assert index_file.exists()
    index_file.write_bytes(index_file.read_bytes()[:100])  # truncated, as after a crash mid-write
    fresh = Collections(engine, tmp_path / "collections")  # a restarted server
    with caplog.at_level(logging.WARNING):
        after = [(h.document_id, round(h.score, 6)) for h in fresh.search(c, "molinos", mode="dense")]
    assert after == before
    assert any("damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)


def test_an_index_file_older_than_the_database_is_rebuilt(books: Collections, engine, tmp_path: Path):
    c = books.create("libros", Viewer())
    books.add(c, DOCS[:2])
    assert len(books.search(c, "dama", mode="dense", k=5)) == 2
    # another process (the CLI) adds a document: this one's memory and file are behind
    other = Collections(engine, tmp_path / "collections")
    other.add(other.get("libros", Viewer()), DOCS[2:])
    assert {h.document_id for h in books.search(c, "dama", mode="dense", k=5)} == {
        "molinos",
        "insula",
        "dulcinea",
    }
