"""`semilla embed` and `semilla index add|search|list|rm`.

`index` works on the server's own database (the same --data-dir / --database-url / SEMILLA_*
settings as `semilla serve` and `semilla admin`), so what it adds the server searches, and the
other way round; it also works while the server is down. Collections it creates belong to
--owner USERNAME, or to nobody: then an open (no accounts, loopback) server and admins see them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semilla.errors import SemillaError
from semilla.retrieval.fusion import DENSE_WEIGHT, FUSIONS

EMBED_HELP = (
    "all-MiniLM-L6-v2 (default; English), multilingual-e5-small (about 100 languages; the multilingual"
    " extra) or a semilla checkpoint directory"
)


def cmd_embed(args: argparse.Namespace) -> int:
    from semilla.retrieval.embedders import load_embedder

    texts = list(args.text)
    if args.file:
        texts += [
            line.rstrip("\n")
            for line in Path(args.file).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    if not texts or any(not t for t in texts):
        raise SemillaError("nothing to embed: give TEXT arguments or --file with one text per line")
    embedder = load_embedder(args.model)
    for i, n in enumerate(embedder.count_tokens(texts)):
        if n > embedder.max_tokens:
            raise SemillaError(
                f"text {i + 1} has {n} tokens; {embedder.name} takes at most {embedder.max_tokens}"
            )
    vectors = embedder.embed_query(texts) if args.query else embedder.embed(texts)
    for text, vector in zip(texts, vectors, strict=True):
        print(
            json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vector]}, ensure_ascii=False)
        )
    return 0


def _json_object(raw: str | None, flag: str) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise SemillaError(f"{flag} must be a JSON object, like '{{\"parte\": 1}}'")
    return value


def _open(args: argparse.Namespace):
    """(Collections over the server's database, the Viewer the CLI acts as)."""
    from semilla.retrieval.collections import Collections, Viewer
    from semilla.serve.accounts import open_store, users
    from semilla.serve.errors import APIError
    from semilla.serve.settings import ServerSettings

    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("database_url", args.database_url)) if v}
    settings = ServerSettings(**overrides)
    store = open_store(settings)
    owner = None
    if getattr(args, "owner", None):
        try:
            owner = users.find_user(store, args.owner).id
        except APIError as e:
            raise SemillaError(e.message) from None
    return Collections(store.engine, Path(settings.data_dir) / "collections"), Viewer(
        owner, admin=owner is None
    )


def _documents(args: argparse.Namespace):
    from semilla.retrieval.collections import NewDocument
    from semilla.retrieval.files import file_text

    metadata = _json_object(args.metadata, "--metadata") or {}
    docs = []
    for name in args.files:
        paths = (
            sorted(p for p in Path(name).rglob("*") if p.is_file()) if Path(name).is_dir() else [Path(name)]
        )
        for path in paths:
            text = file_text(str(path), path.read_bytes())
            docs.append(NewDocument(text, str(path), {"source": str(path), **metadata}))
    if args.text is not None:
        docs.append(NewDocument(args.text, args.id, metadata))
    if not docs:
        raise SemillaError("nothing to add: give FILE arguments or --text")
    return docs


def cmd_index_add(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from semilla.retrieval.chunking import ChunkConfig
    from semilla.retrieval.collections import NotFound

    books, viewer = _open(args)
    docs = _documents(args)
    try:
        row = books.get(args.collection, viewer, write=True)
    except NotFound:
        row = books.create(
            args.collection, viewer, args.embedding_model, ChunkConfig(args.chunk_size, args.chunk_overlap)
        )
        print(f"created collection {row.name} ({row.embedder}, {row.dim} dims)", file=sys.stderr)
    with tqdm(desc=f"embedding into {row.name}", unit="chunk", disable=args.quiet) as bar:
        result = books.add(row, docs, progress=bar.update)
    print(
        f"added {len(result.added)} documents ({result.chunks} chunks), {len(result.duplicates)} already there"
    )
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    books, viewer = _open(args)
    row = books.get(args.collection, viewer)
    wanted = _json_object(args.filter, "--filter")
    hits = books.search(row, args.query, args.k, args.mode, wanted, args.fusion, args.expand)
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(json.dumps(vars(hit), ensure_ascii=False))
        else:
            snippet = " ".join(hit.text.split())[:160]
            print(f"{rank}. {hit.document_id} #{hit.chunk}  {hit.score:.4f}  {snippet}")
    return 0


def cmd_index_list(args: argparse.Namespace) -> int:
    books, viewer = _open(args)
    infos = books.list(viewer)
    if args.json:
        print(json.dumps([i.as_dict() for i in infos]))
        return 0
    for i in infos:
        shared = ", shared" if i.shared else ""
        print(f"{i.name}: {i.documents} documents, {i.chunks} chunks, {i.embedder} ({i.dim} dims){shared}")
    return 0


def cmd_index_rm(args: argparse.Namespace) -> int:
    books, viewer = _open(args)
    row = books.get(args.collection, viewer, write=True)
    if args.document:
        books.delete_document(row, args.document)
        print(f"removed document {args.document} from {row.name}")
        return 0
    if not args.yes:
        raise SemillaError(f"removing collection {row.name} deletes all its documents: add --yes")
    books.drop(row)
    print(f"removed collection {row.name}")
    return 0


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", help="the server's data directory (default: semilla-data, $SEMILLA_DATA_DIR)"
    )
    p.add_argument("--database-url", help="the server's database (default: SQLite in --data-dir)")
    p.add_argument("--owner", help="act as this user's collections (default: the unowned ones, as an admin)")


def add_parsers(sub) -> None:
    p = sub.add_parser("embed", help="print the embedding of each text, one JSON line each")
    p.add_argument("text", nargs="*", help="texts to embed")
    p.add_argument("--file", help="a text file: one text per line")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help=EMBED_HELP)
    p.add_argument(
        "--query",
        action="store_true",
        help="embed the texts as search queries (multilingual-e5-small marks queries apart from documents)",
    )
    p.set_defaults(func=cmd_embed)

    index = sub.add_parser(
        "index",
        help="document collections for retrieval: add, search, list, rm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    p = isub.add_parser(
        "add", help="add UTF-8 text files (or folders) to a collection, creating it if needed"
    )
    p.add_argument("collection")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--text", help="add this text as one document")
    p.add_argument("--id", help="the --text document's id (default: a fresh one)")
    p.add_argument("--metadata", help="a JSON object for every added document, e.g. '{\"parte\": 1}'")
    p.add_argument(
        "--embedding-model", default="all-MiniLM-L6-v2", help=f"for a new collection: {EMBED_HELP}"
    )
    p.add_argument("--chunk-size", type=int, default=1000, help="for a new collection: characters per chunk")
    p.add_argument("--chunk-overlap", type=int, default=100, help="for a new collection: characters shared")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _store_flags(p)
    p.set_defaults(func=cmd_index_add)

    p = isub.add_parser("search", help="the chunks that best answer a query (BM25 + dense, fused)")
    p.add_argument("collection")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=4, help="how many chunks (default 4)")
    p.add_argument("--mode", choices=("hybrid", "dense", "bm25"), default="hybrid")
    p.add_argument(
        "--fusion",
        choices=FUSIONS,
        default=FUSIONS[0],
        help=f"how hybrid fuses BM25 and dense: reciprocal ranks, or min-max normalised scores "
        f"weighted {1 - DENSE_WEIGHT:g} BM25 / {DENSE_WEIGHT:g} dense (default {FUSIONS[0]})",
    )
    p.add_argument(
        "--expand",
        action="store_true",
        help="bm25 and hybrid: search BM25 again with the query expanded by the best terms of the "
        "first answer's best chunks, then fuse again (pseudo-relevance feedback, RM3; helps when "
        "the answer spans many chunks, may hurt a question that one passage answers)",
    )
    p.add_argument("--filter", help="metadata that must match, a JSON object, e.g. '{\"parte\": 1}'")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    _store_flags(p)
    p.set_defaults(func=cmd_index_search)

    p = isub.add_parser("list", help="collections with their sizes")
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_index_list)

    p = isub.add_parser("rm", help="remove a document, or a whole collection with --yes")
    p.add_argument("collection")
    p.add_argument("document", nargs="?", help="the document id to remove (default: the whole collection)")
    p.add_argument("--yes", action="store_true", help="confirm removing a whole collection")
    _store_flags(p)
    p.set_defaults(func=cmd_index_rm)
