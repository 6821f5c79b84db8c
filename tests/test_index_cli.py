"""`semilla index add|search|list|rm` and `semilla embed` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli

from semilla.retrieval.embedders import E5, MINILM, load_embedder


def test_index_round_trip(tmp_path: Path, cli_in_process):
    """The first command runs as a user runs it, in its own process; the rest run in this one
    (the same `main`, without importing torch and loading the embedder again for each)."""
    data = ["--data-dir", str(tmp_path / "data")]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "molinos.txt").write_text(
        "Don Quijote atacó los molinos de viento.", encoding="utf-8"
    )
    (tmp_path / "docs" / "insula.md").write_text("Sancho gobernó la ínsula Barataria.", encoding="utf-8")
    added = run_cli("index", "add", "libros", str(tmp_path / "docs"), "--metadata", '{"parte": 1}', *data)
    assert added.returncode == 0, added.stderr
    assert "added 2 documents (2 chunks), 0 already there" in added.stdout
    assert "created collection libros" in added.stderr and "embedding into libros" in added.stderr  # progress
    again = cli_in_process("index", "add", "libros", str(tmp_path / "docs" / "insula.md"), "--quiet", *data)
    assert "added 0 documents (0 chunks), 1 already there" in again.stdout
    listed = cli_in_process("index", "list", "--json", *data)
    assert [(c["name"], c["documents"]) for c in json.loads(listed.stdout)] == [("libros", 2)]
    found = cli_in_process(
        "index", "search", "libros", "ínsula Barataria", "-k", "1", "--fusion", "rrf", "--json", *data
    )
    hit = json.loads(found.stdout)
    assert hit["document_id"].endswith("insula.md") and hit["metadata"]["parte"] == 1
    doc_id = hit["document_id"]
    plain, expanded = (
        json.loads(cli_in_process("index", "search", "libros", "ínsula Barataria", "--mode", "bm25", *flags, "--json",
                                  *data).stdout)
        for flags in ([], ["--expand"])
    )  # fmt: skip
    assert plain["document_id"] == expanded["document_id"] == doc_id
    assert expanded["score"] != pytest.approx(plain["score"])  # the query's two terms weigh half, not 2
    assert_one_line_error(
        cli_in_process("index", "search", "libros", "x", "--mode", "dense", "--expand", *data), "expand"
    )
    assert cli_in_process("index", "rm", "libros", doc_id, *data).returncode == 0
    assert_one_line_error(cli_in_process("index", "rm", "libros", *data), "--yes")
    assert cli_in_process("index", "rm", "libros", "--yes", *data).returncode == 0
    assert_one_line_error(
        cli_in_process("index", "search", "libros", "x", *data), "collection 'libros' does not exist"
    )


def test_index_bad_input_is_one_line(tmp_path: Path, cli_in_process):
    data = ["--data-dir", str(tmp_path / "data")]
    (tmp_path / "x.bin").write_bytes(bytes(range(256)))
    assert_one_line_error(
        run_cli("index", "add", "libros", str(tmp_path / "x.bin"), *data), "x.bin", "binary"
    )
    assert_one_line_error(
        cli_in_process("index", "add", "libros", "--text", "hola", "--metadata", "{parte", *data),
        "--metadata",
    )
    assert_one_line_error(cli_in_process("index", "list", "--owner", "nadie", *data), "nadie")


def test_embed_prints_the_library_vectors(tmp_path: Path, cli_in_process):
    proc = run_cli("embed", "hola", "adiós")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["hola", "adiós"]
    expected = load_embedder(MINILM).embed(["hola", "adiós"])
    assert np.abs(np.array([r["embedding"] for r in rows]) - expected).max() < 1e-6
    assert_one_line_error(cli_in_process("embed", "palabra " * 400), "tokens", "at most 256")


def test_embed_with_e5_prints_passage_or_query_vectors():
    emb = load_embedder(E5)
    for flags, expected in (([], emb.embed(["hola"])), (["--query"], emb.embed_query(["hola"]))):
        proc = run_cli("embed", "hola", "--model", E5, *flags)
        assert proc.returncode == 0, proc.stderr
        assert np.abs(np.array(json.loads(proc.stdout)["embedding"]) - expected[0]).max() < 1e-6
