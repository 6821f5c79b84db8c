"""Corpus -> tokenizer + memory-mapped token shards, and batches drawn from them.

A prepared dataset is a directory:
    tokenizer.json, tokenizer_config.json   the tokenizer
    train_000.bin, val_000.bin, ...         token ids, uint16 (or uint32 for big vocabs)
    train_000.mask, ...                     chat data only: 1 per token that counts in the loss
                                            (assistant turns), 0 elsewhere; uint8, same length
    meta.json                               dtype, shards, token counts, corpus statistics
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semilla.atomic import atomic_directory, existing_dir, refuse_to_replace
from semilla.errors import DataError
from semilla.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
SPLITS = ("train", "val", "test")
SHARD_TOKENS = 1 << 28  # 256M tokens (512 MB of uint16) per shard file
ENCODE_CHARS = 1 << 16  # text is encoded in slices of about this size: memory stays flat
BPE_SAMPLE_BYTES = 64 << 20  # BPE learns its merges from at most this much of the corpus
FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # tried, in order, for text that is not UTF-8


@dataclass(frozen=True)
class Piece:
    """A document, or a chunk of a big one: a byte range of a file (a line, for JSONL)."""

    path: str
    start: int
    end: int
    ends_document: bool = True  # False for all but the last chunk of a big file
    scrub_pii: bool = False  # mask emails, phones, cards, IBANs and IPs when read
    encoding: str = "utf-8"


# --- finding and reading the corpus -------------------------------------------------------


def find_files(inputs: list[str], encoding: str | None = None) -> dict[Path, str]:
    """Files, folders (searched recursively for .txt/.md/.jsonl) and glob patterns, each with
    the encoding its text is read in (`encoding`, or detected); binary files are skipped."""
    if not inputs:
        raise DataError("no input given: name text files, folders or glob patterns")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"no files match {item!r}")
            files += [m for m in matches if m.is_file()]
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input not found: {item}")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"unknown text encoding {encoding!r} (try utf-8, cp1252 or latin-1)") from None
    found = {f: text_encoding(f, encoding) for f in dict.fromkeys(files)}
    kept = {f: enc for f, enc in found.items() if enc is not None}
    if not kept:
        raise DataError(f"no text files found in {', '.join(inputs)}")
    return kept


def text_encoding(path: Path, forced: str | None = None) -> str | None:
    """The encoding to read `path` in, judged by its first 64 KB: `forced`, else UTF-8, else
    Windows-1252 or Latin-1 (older Spanish texts), with a warning; None for a binary file."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        log.warning("skipping %s: binary file (NUL bytes)", path)
        return None
    if forced:
        return forced
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last char is fine
        return "utf-8"
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            text = head.decode(encoding)
        except UnicodeDecodeError:
            continue
        controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f\v")
        if controls > len(text) // 100:  # text has almost none; binary data has plenty
            break
        log.warning("%s is not UTF-8: reading it as %s (choose another with --encoding)", path, encoding)
        return encoding
    log.warning("skipping %s: not text in UTF-8, cp1252 or latin-1 (binary?)", path)
    return None


def list_pieces(files: dict[Path, str], chunk_bytes: int | None = None) -> list[Piece]:
    """Cut files into pieces: JSONL lines, or text chunks that end at a line break.

    Chunks are about total/100 bytes (1 KB to 4 MB), so even a single file yields enough
    pieces for all three splits, and no document needs to fit in memory.
    """
    total = sum(f.stat().st_size for f in files)
    if chunk_bytes is None:
        chunk_bytes = max(1 << 10, min(4 << 20, total // 100))
    pieces: list[Piece] = []
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if f.suffix.lower() == ".jsonl":
                pos = 0
                for line in fh:
                    if line.strip():
                        pieces.append(Piece(str(f), pos, pos + len(line), encoding=files[f]))
                    pos += len(line)
                continue
            start = 0
            while start < size:
                end = min(size, start + chunk_bytes)
                if end < size:
                    end = _cut_point(fh, end, size)
                pieces.append(Piece(str(f), start, end, ends_document=end >= size, encoding=files[f]))
                start = end
    return pieces


def _cut_point(fh, target: int, size: int) -> int:
    """The first byte after a newline at or past `target` (or a UTF-8 boundary if none near)."""
    fh.seek(target)
    window = fh.read(1 << 16)
    nl = window.find(b"\n")
    if nl >= 0:
        return target + nl + 1
    fh.seek(target)
    b = fh.read(4)
    back = 0
    while back < len(b) and (b[back] & 0xC0) == 0x80:  # continuation bytes: move past them
        back += 1
    return min(size, target + back)


def read_piece(piece: Piece) -> list[dict | str]:
    """The documents in a piece: a string, or a chat example {'messages': [...]} for JSONL."""
    if piece.scrub_pii:
        from semilla.privacy import scrub_value

        return scrub_value(read_piece(dataclasses.replace(piece, scrub_pii=False)))
    with open(piece.path, "rb") as fh:
        fh.seek(piece.start)
        raw = fh.read(piece.end - piece.start)
    text = raw.decode(piece.encoding, errors="replace")
    if not piece.path.lower().endswith(".jsonl"):
        return [text]
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{piece.path}: a line at byte {piece.start} is not valid JSON ({e.msg})") from e
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return [row["text"]]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return [row]
    raise DataError(f'{piece.path}: a line at byte {piece.start} needs "text" (string) or "messages" (list)')


def encode_in_slices(
    tok: Tokenizer, doc: dict | str, ends_document: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token ids of a document (or a chunk), closed with <eos> so documents never run together,
    with their loss mask (all ones for text, the assistant turns only for a chat example); text
    a slice of about ENCODE_CHARS characters at a time: a tokenizer's encoding of a long text
    holds ~100 bytes per token."""
    if isinstance(doc, str):
        for piece in text_slices(doc):
            ids = tok.encode_array(piece)
            yield ids, np.ones(len(ids), dtype=np.uint8)
        if ends_document:
            yield np.asarray([tok.eos_id], dtype=np.int64), np.ones(1, dtype=np.uint8)
        return
    ids, mask = tok.encode_chat(doc["messages"])
    yield np.asarray(ids + [tok.eos_id], dtype=np.int64), np.asarray(mask + [0], dtype=np.uint8)


def text_slices(text: str, size: int = ENCODE_CHARS) -> Iterator[str]:
    """`text` cut into slices of at most `size` characters, each cut at the start of a run of
    whitespace: byte-level BPE's pre-tokenizer splits there too (and char tokens anywhere), so
    encoding the slices gives the ids of the whole. Only a word longer than `size` is cut."""
    start = 0
    while len(text) - start > size:
        end, cut = start + size, start + size
        while end > start:
            i = max(text.rfind(c, start + 1, end + 1) for c in " \n\t")
            if i < 0:
                break
            if not text[i - 1].isspace():
                cut = i
                break
            end = i - 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def _document_text(doc: dict | str) -> str:
    return doc if isinstance(doc, str) else "\n".join(str(m.get("content") or "") for m in doc["messages"])


# --- split and write ----------------------------------------------------------------------


def split_pieces(
    pieces: list[Piece], fractions: tuple[float, float, float], seed: int, shuffle: bool = True
) -> dict[str, list[Piece]]:
    """Assign whole pieces to train/val/test; every split with a non-zero share gets >= 1."""
    order = list(pieces)
    if shuffle:
        random.Random(seed).shuffle(order)
    n = len(order)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if fractions[1] > 0 and n >= 3:
        n_val = max(1, n_val)
    if fractions[2] > 0 and n >= 3:
        n_test = max(1, n_test)
    n_train = n - n_val - n_test
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


class ShardWriter:
    """Appends token ids to `{split}_NNN.bin` files, starting a new one every SHARD_TOKENS;
    with `with_mask`, their loss masks to `{split}_NNN.mask` beside them."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int = SHARD_TOKENS,
        with_mask: bool = False,
    ):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.with_mask = with_mask
        self.shards: list[dict] = []
        self._files: list = []  # the open shard file, and its mask file
        self._count = 0

    def write(self, ids: list[int], mask: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        mask_arr = np.asarray(mask, dtype=np.uint8)
        while len(arr):
            if not self._files or self._count == self.shard_tokens:
                self._open_next()
            n = min(len(arr), self.shard_tokens - self._count)
            self._files[0].write(arr[:n].tobytes())
            if self.with_mask:
                self._files[1].write(mask_arr[:n].tobytes())
            self._count += n
            self.shards[-1]["tokens"] = self._count
            arr, mask_arr = arr[n:], mask_arr[n:]

    def _open_next(self) -> None:
        self.close()
        shard = {"file": f"{self.split}_{len(self.shards):03d}.bin", "tokens": 0}
        if self.with_mask:
            shard["mask"] = f"{self.split}_{len(self.shards):03d}.mask"
        self._files = [open(self.directory / shard[k], "wb") for k in ("file", "mask") if k in shard]  # noqa: SIM115 (closed in close())
        self._count = 0
        self.shards.append(shard)

    def drop_masks(self) -> None:
        """Forget the masks (the data had no chat rows: every token counts)."""
        for shard in self.shards:
            (self.directory / shard.pop("mask")).unlink()

    def close(self) -> None:
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = []


def _train_tokenizer(
    pieces: list[Piece], kind: str, vocab_size: int, inputs: list[str], seed: int = 42
) -> Tokenizer:
    """char: every character of the corpus; bpe: merges learned from (a sample of) it. The text
    is read a slice at a time, so memory stays flat."""

    def texts(chosen: list[Piece]) -> Iterator[str]:
        for p in chosen:
            for doc in read_piece(p):
                yield from text_slices(_document_text(doc))

    if kind == "char":
        tok = Tokenizer.train_char(texts(pieces))
    else:
        tok = Tokenizer.train_bpe(texts(bpe_sample(pieces, seed)), vocab_size)
    if tok.vocab_size <= 8:
        raise DataError(f"the corpus is empty: {', '.join(inputs)} has no characters")
    return tok


def train_tokenizer(inputs: list[str], kind: str = "char", vocab_size: int = 8192) -> Tokenizer:
    """A new tokenizer (char | bpe) trained on every document of `inputs` (files, folders, globs)."""
    if kind not in ("char", "bpe"):
        raise DataError(f"tokenizer must be 'char' or 'bpe', got {kind!r}")
    return _train_tokenizer(list_pieces(find_files(inputs)), kind, vocab_size, inputs)


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """Where the tokenizer of a prepared dataset, a checkpoint or a run directory (its best/,
    else last/ checkpoint) lies."""
    p = Path(path)
    for candidate in (p, existing_dir(p / "best"), existing_dir(p / "last")):
        if candidate is not None and (candidate / "tokenizer.json").is_file():
            return candidate
    return p  # Tokenizer.load names what is missing


def prepare(
    inputs: list[str],
    out_dir: str,
    tokenizer: str = "char",
    vocab_size: int = 8192,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    shuffle: bool = True,
    tokenizer_from: str | Tokenizer | None = None,
    chunk_bytes: int | None = None,
    progress: bool = False,
    scrub_pii: bool = False,
    encoding: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Tokenize a corpus into `out_dir` (written to a temporary sibling, then renamed), with a
    new tokenizer, or `tokenizer_from`: a Tokenizer, or a dataset, checkpoint or run directory.

    Files are read in `encoding`, or each in the one detected (UTF-8, else cp1252/latin-1).
    An existing non-empty `out_dir` is replaced only with `overwrite`. Memory stays flat
    however big the corpus: pieces are read and encoded one slice at a time.
    Returns the statistics also stored in meta.json.
    """
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1) > 1e-6 or split[0] <= 0:
        raise DataError(
            f"split must be three non-negative fractions summing to 1 with train > 0, got {split}"
        )
    if tokenizer not in ("char", "bpe"):
        raise DataError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    refuse_to_replace(out_dir, overwrite)
    if split[1] == 0:
        log.warning(
            "the split %s leaves no validation text: training will validate on its training data, "
            "so its validation loss cannot show overfitting",
            ",".join(f"{f:g}" for f in split),
        )
    files = find_files(inputs, encoding)
    pieces = list_pieces(files, chunk_bytes)
    if scrub_pii:
        pieces = [dataclasses.replace(p, scrub_pii=True) for p in pieces]
    if not pieces:
        raise DataError(f"the corpus is empty: {', '.join(inputs)} has no text")
    splits = split_pieces(pieces, split, seed, shuffle)
    if isinstance(tokenizer_from, Tokenizer):
        tok = tokenizer_from
    elif tokenizer_from:
        tok = Tokenizer.load(tokenizer_dir(tokenizer_from))
    else:
        tok = _train_tokenizer(pieces, tokenizer, vocab_size, inputs, seed)

    with atomic_directory(out_dir) as tmp:
        stats = _write_splits(tok, splits, tmp, progress)
        stats.update(
            tokenizer=tok.kind,
            vocab_size=tok.vocab_size,
            seed=seed,
            split=list(split),
            inputs=[str(f) for f in files],
            encodings={str(f): enc for f, enc in files.items() if enc != "utf-8"},
        )
        tok.save(tmp)
        (tmp / "meta.json").write_text(
            json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return stats


def bpe_sample(pieces: list[Piece], seed: int, budget: int = BPE_SAMPLE_BYTES) -> list[Piece]:
    """The pieces BPE learns from: all of a corpus up to `budget` bytes, else a random sample
    of about `budget` bytes (merges settle long before a gigabyte; counting them all would
    take minutes), which is said in the log."""
    total = sum(p.end - p.start for p in pieces)
    if total <= budget:
        return pieces
    order = random.Random(seed).sample(pieces, len(pieces))
    chosen, size = [], 0
    for p in order:
        if size >= budget:
            break
        chosen.append(p)
        size += p.end - p.start
    log.info(
        "training the BPE tokenizer on a %d MB random sample of the %d MB corpus", size >> 20, total >> 20
    )
    return chosen


def _write_splits(tok: Tokenizer, splits: dict[str, list[Piece]], directory: Path, progress: bool) -> dict:
    from tqdm import tqdm

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    stats: dict = {"dtype": dtype.name, "splits": {}}
    # only JSONL can hold chat rows; masks are dropped again if none turns up
    with_mask = any(p.path.lower().endswith(".jsonl") for ps in splits.values() for p in ps)
    writers: list[ShardWriter] = []
    has_chat = False
    words: set[str] = set()
    n_words = n_chars = n_tokens = n_unk = 0
    seen = np.zeros(tok.vocab_size, dtype=bool)
    bar = tqdm(
        total=sum(p.end - p.start for ps in splits.values() for p in ps),
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc="tokenizing",
    )
    for name, pieces in splits.items():
        writer = ShardWriter(directory, name, dtype, with_mask=with_mask)
        writers.append(writer)
        docs_in_split = chars_in_split = 0  # documents = whole files or JSONL rows
        for piece in pieces:  # one piece (at most 4 MB of text) in memory at a time
            docs = read_piece(piece)
            for doc in docs:
                has_chat = has_chat or isinstance(doc, dict)
                for arr, mask in encode_in_slices(tok, doc, piece.ends_document):
                    writer.write(arr, mask)
                    seen[arr] = True
                    n_unk += int((arr == tok.unk_id).sum())
                    n_tokens += len(arr)
                for text in text_slices(_document_text(doc)):
                    chars_in_split += len(text)
                    tokens_of_text = text.split()
                    n_words += len(tokens_of_text)
                    words.update(tokens_of_text)
            docs_in_split += len(docs) if piece.ends_document else 0
            bar.update(piece.end - piece.start)
        writer.close()
        n_chars += chars_in_split
        stats["splits"][name] = {
            "documents": docs_in_split,
            "pieces": len(pieces),  # documents and chunks of big files, the unit of the split
            "characters": chars_in_split,
            "tokens": sum(s["tokens"] for s in writer.shards),
            "shards": writer.shards,
        }
    bar.close()
    if with_mask and not has_chat:
        for writer in writers:
            writer.drop_masks()
    stats["loss_mask"] = has_chat
    stats.update(
        documents=sum(s["documents"] for s in stats["splits"].values()),
        characters=n_chars,
        tokens=n_tokens,
        vocab_coverage=round(1 - n_unk / max(1, n_tokens), 6),  # share of tokens that are not <unk>
        vocab_used=round(float(seen.mean()), 6),  # share of the vocabulary that occurs
        type_token_ratio=round(len(words) / max(1, n_words), 6),  # distinct words / words
        chars_per_token=round(n_chars / max(1, n_tokens), 4),
    )
    return stats
