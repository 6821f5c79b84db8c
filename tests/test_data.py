"""Data preparation: folders/globs of .txt/.md/.jsonl -> shards + meta.json; batches and windows."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from semilla.batches import TokenDataset
from semilla.data import bpe_sample, find_files, list_pieces, prepare, text_slices
from semilla.errors import DataError
from semilla.tokenizer import Tokenizer

CHAT = {
    "messages": [
        {"role": "user", "content": "¿Quién es Sancho?"},
        {"role": "assistant", "content": "El escudero."},
    ]
}


def read_split(directory: Path, split: str) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    files = [directory / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for f in files] or [np.zeros(0)])


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Three small documents of each kind: .txt, .md (in a subfolder) and .jsonl rows."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("En un lugar de la Mancha.\n", encoding="utf-8")
    (folder / "sub" / "b.md").write_text(
        "# Capítulo\n\nDe cuyo nombre no quiero acordarme.\n", encoding="utf-8"
    )
    rows = [{"text": "Un hidalgo de los de lanza."}, CHAT, {"text": "Adarga antigua."}]
    (folder / "c.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8"
    )
    (folder / "ignored.csv").write_text("not,a,text,suffix\n", encoding="utf-8")
    return folder


def test_prepare_folder_of_txt_md_jsonl(tmp_path: Path, mixed_folder: Path) -> None:
    out = tmp_path / "prepared"
    stats = prepare([str(mixed_folder)], str(out))
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta == json.loads(json.dumps(stats))
    assert sorted(Path(p).name for p in meta["inputs"]) == ["a.txt", "b.md", "c.jsonl"]
    assert meta["documents"] == 5  # a.txt, b.md and three JSONL rows
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char"
    texts = [
        "En un lugar de la Mancha.\n",
        "# Capítulo\n\nDe cuyo nombre no quiero acordarme.\n",
        "Un hidalgo de los de lanza.",
        "¿Quién es Sancho?\nEl escudero.",
        "Adarga antigua.",
    ]
    assert meta["characters"] == sum(len(t) for t in texts)
    assert meta["vocab_size"] == 8 + len(set("".join(texts)))
    assert meta["vocab_coverage"] == 1.0
    assert 0 < meta["type_token_ratio"] <= 1 and 0 < meta["vocab_used"] <= 1
    assert sum(s["documents"] for s in meta["splits"].values()) == 5
    # every token on disk is counted; each document ends with <eos>
    tok = Tokenizer.load(out)
    all_ids = np.concatenate([read_split(out, s) for s in ("train", "val", "test")])
    assert len(all_ids) == meta["tokens"] == sum(s["tokens"] for s in meta["splits"].values())
    assert int((all_ids == tok.eos_id).sum()) == 5
    # the chat row is stored through the chat template, role tokens and all
    chat = tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False) + [tok.eos_id]
    assert np.asarray(chat, dtype=np.uint16).tobytes() in all_ids.tobytes()


def test_single_big_file_fills_all_three_splits(tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "prepared"
    meta = prepare([str(corpus_file)], str(out))
    assert meta["documents"] == 1
    for split in ("train", "val", "test"):
        assert meta["splits"][split]["tokens"] > 0, split
        assert meta["splits"][split]["pieces"] >= 1, split
        path = out / f"{split}_000.bin"
        assert path.stat().st_size == 2 * meta["splits"][split]["tokens"]  # uint16 on disk
    pieces = {s: meta["splits"][s]["pieces"] for s in ("train", "val", "test")}
    total = sum(pieces.values())
    assert total >= 10 and pieces["train"] >= 0.7 * total  # about 80/10/10


def test_unshuffled_split_reassembles_the_text(tmp_path: Path, corpus_file: Path, corpus_text: str) -> None:
    out = tmp_path / "prepared"
    prepare([str(corpus_file)], str(out), shuffle=False)
    tok = Tokenizer.load(out)
    ids = np.concatenate([read_split(out, s) for s in ("train", "val", "test")])
    assert ids.dtype == np.uint16
    assert ids[-1] == tok.eos_id and int((ids == tok.eos_id).sum()) == 1  # one document
    assert tok.decode(ids.tolist(), skip_special_tokens=True) == corpus_text


def test_prepare_is_deterministic_for_a_seed(tmp_path: Path, corpus_file: Path) -> None:
    def shards(name: str, seed: int) -> dict[str, bytes]:
        out = tmp_path / name
        prepare([str(corpus_file)], str(out), seed=seed)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}

    first, again, other = shards("a", 7), shards("b", 7), shards("c", 8)
    assert first == again
    assert first != other  # another seed assigns other chunks to val/test


def test_glob_inputs(tmp_path: Path, mixed_folder: Path) -> None:
    files = find_files([str(mixed_folder / "**" / "*.md"), str(mixed_folder / "*.txt")])
    assert [f.name for f in files] == ["b.md", "a.txt"]
    meta = prepare([str(mixed_folder / "*.jsonl")], str(tmp_path / "out"))
    assert [Path(p).name for p in meta["inputs"]] == ["c.jsonl"]
    assert meta["documents"] == 3
    with pytest.raises(DataError, match="no files match"):
        find_files([str(mixed_folder / "*.nothing")])


def test_binary_file_in_folder_is_skipped_with_warning(
    tmp_path: Path, mixed_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (mixed_folder / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with caplog.at_level(logging.WARNING, logger="semilla.data"):
        files = find_files([str(mixed_folder)])
    assert "photo.txt" not in [f.name for f in files]
    assert any("photo.txt" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", ["", None], ids=["empty-file", "empty-folder"])
def test_empty_corpus_is_an_error(tmp_path: Path, content: str | None) -> None:
    if content is None:
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text("", encoding="utf-8")
        (tmp_path / "docs" / "b.md").write_text("", encoding="utf-8")
        target = tmp_path / "docs"
    else:
        target = tmp_path / "empty.txt"
        target.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare([str(target)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written half-way
    assert not list(tmp_path.glob(".out*"))


def test_bad_jsonl_row_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="rows.jsonl"):
        prepare([str(bad)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_random_batch_shapes_and_shift(prepared_dir: Path) -> None:
    data = TokenDataset(prepared_dir, "train")
    tokens = np.concatenate([np.asarray(s) for s in data.shards]).astype(np.int64)
    x, y = data.random_batch(5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    as_bytes = tokens.tobytes()
    for row in torch.cat([x, y[:, -1:]], dim=1):  # each row is a real window of the split
        assert row.numpy().tobytes() in as_bytes
    again_x, again_y = data.random_batch(5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, again_x) and torch.equal(y, again_y)


def test_strided_windows_robo_poet_100_50(prepared_dir: Path) -> None:
    data = TokenDataset(prepared_dir, "train")
    tokens = np.asarray(data.shards[0]).astype(np.int64)
    windows = list(data.strided_windows(100, 50))
    starts = list(range(0, len(tokens) - 100, 50))
    assert len(windows) == len(starts)
    for start, window in zip(starts, windows, strict=True):
        assert len(window) == 101
        assert torch.equal(window, torch.from_numpy(tokens[start : start + 101]))


def test_block_size_larger_than_data(prepared_dir: Path) -> None:
    data = TokenDataset(prepared_dir, "val")
    with pytest.raises(DataError, match="block_size"):
        data.check_block_size(data.n_tokens)
    data.check_block_size(data.n_tokens - 1)


def test_missing_or_truncated_shards(tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "prepared"
    prepare([str(corpus_file)], str(out))
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenDataset(tmp_path)
    shard = out / "val_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(out, "val")


# --- encodings ----------------------------------------------------------------------------

OLD_SPANISH = "¿Qué día es hoy? ¡Mañana será otro! El niño pagó 5 € por el café de la señora.\n" * 40


def test_a_windows_1252_file_is_read_as_such_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "viejo.txt"
    path.write_bytes(OLD_SPANISH.encode("cp1252"))
    with caplog.at_level(logging.WARNING, logger="semilla.data"):
        stats = prepare([str(path)], str(tmp_path / "out"), split=(1.0, 0.0, 0.0))
    assert stats["encodings"] == {str(path): "cp1252"}
    warning = next(r.getMessage() for r in caplog.records if "viejo.txt" in r.getMessage())
    assert "cp1252" in warning and "--encoding" in warning
    tok = Tokenizer.load(tmp_path / "out")
    ids = np.fromfile(tmp_path / "out" / "train_000.bin", dtype=np.uint16).tolist()
    assert tok.decode(ids, skip_special_tokens=True) == OLD_SPANISH  # ñ, ¿, € and all


def test_encoding_can_be_chosen(tmp_path: Path) -> None:
    path = tmp_path / "viejo.txt"
    path.write_bytes(OLD_SPANISH.replace("€", "$").encode("latin-1"))
    stats = prepare([str(path)], str(tmp_path / "out"), encoding="latin-1")
    assert stats["encodings"] == {str(path): "latin-1"}
    with pytest.raises(DataError, match="unknown text encoding 'klingon'"):
        prepare([str(path)], str(tmp_path / "other"), encoding="klingon")


def test_prepare_names_the_files_it_decoded_otherwise(tmp_path: Path) -> None:
    from helpers import run_cli

    path = tmp_path / "viejo.txt"
    path.write_bytes(OLD_SPANISH.encode("cp1252"))
    proc = run_cli("prepare", path, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"read as cp1252 +{re.escape(str(path))}\n", proc.stdout), proc.stdout
    assert "viejo.txt" in proc.stderr and "skipping" not in proc.stderr


# --- memory: bounded slices, a BPE sample -------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("layout", ["lines", "one-line", "double-spaces"])
def test_encoding_in_slices_gives_the_ids_of_the_whole_text(corpus_text: str, kind: str, layout: str) -> None:
    text = {
        "lines": corpus_text,
        "one-line": corpus_text.replace("\n", " "),
        "double-spaces": corpus_text.replace(" ", "  ").replace("\n", "\n\n  "),
    }[layout]
    tok = Tokenizer.train_char([text]) if kind == "char" else Tokenizer.train_bpe([text], 400)
    slices = list(text_slices(text, size=500))
    assert len(slices) > 10 and "".join(slices) == text
    assert max(map(len, slices)) <= 500
    assert [i for piece in slices for i in tok.encode(piece)] == tok.encode(text)


def test_bpe_learns_from_a_sample_of_a_huge_corpus_and_says_so(
    corpus_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pieces = list_pieces({corpus_file: "utf-8"}, chunk_bytes=1000)
    with caplog.at_level(logging.INFO, logger="semilla.data"):
        chosen = bpe_sample(pieces, seed=1, budget=5000)
    size = sum(p.end - p.start for p in chosen)
    assert 5000 <= size < 7000 and len(chosen) < len(pieces)
    assert "random sample" in caplog.text
    assert bpe_sample(pieces, seed=1, budget=10**9) == pieces  # a small corpus is used whole


def test_a_split_without_validation_is_warned_up_front(
    tmp_path: Path, corpus_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="semilla.data"):
        prepare([str(corpus_file)], str(tmp_path / "out"), split=(1.0, 0.0, 0.0))
    assert "validate on its training data" in caplog.text


def test_char_ids_from_the_table_equal_the_tokenizers_library(corpus_text: str) -> None:
    tok = Tokenizer.train_char([corpus_text + "\r\t😀<eos>"])
    text = corpus_text[:2000] + "\r\n\t<eos> 😀 zzz 中文 <|user|> \x00"  # unknown characters too
    assert tok.encode_array(text).tolist() == tok.encode(text)
