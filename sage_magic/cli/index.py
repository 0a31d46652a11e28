"""`sage index ...`: build, refresh, inspect and query the document indexes chat answers are grounded in."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..core.config import Settings
from ..faces.text import table
from .output import TerminalProgress

if TYPE_CHECKING:
    from ..rag import ChunkSettings


STORE_HELP = ("where the index lives: local files (default, or SAGE_INDEX_STORE) or a Milvus server: "
              "milvus://HOST:PORT, http://HOST:PORT, https://HOST[:PORT]")


def _store(parser: argparse.ArgumentParser, help: str = STORE_HELP) -> None:
    parser.add_argument("--store", metavar="URI", help=help)


def define(index: argparse.ArgumentParser) -> None:
    """`sage index`'s actions and their options (main.COMMANDS)."""
    commands = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    checked = "the store the index must be in (an existing index is always found where it was built)"

    add = commands.add_parser("add", help="create an index from folders, files or globs, or add paths to it")
    add.add_argument("name", help="index name: letters, digits, '-', '_', '.'")
    add.add_argument("paths", nargs="+", metavar="PATH_OR_GLOB", help="folders (recursive), files, or quoted globs")
    add.add_argument("--embedder",
                     help="sentence-transformers model folder (env SAGE_EMBEDDER; default bundled MiniLM)")
    add.add_argument("--chunk-size", type=int, help="characters per chunk (default 800)")
    add.add_argument("--chunk-overlap", type=int,
                     help="characters shared by neighbouring chunks (default 160, or a fifth of --chunk-size)")
    add.add_argument("--rebuild", action="store_true", help="start over: re-read and re-embed everything")
    _store(add)
    add.add_argument("--store-token-env", metavar="VAR",
                     help="env var holding the Milvus server's token, user:password or API key (default MILVUS_TOKEN)")
    add.set_defaults(run=run_add)

    update = commands.add_parser("update", help="re-embed changed files, add new ones, forget deleted ones")
    update.add_argument("name")
    _store(update, checked)
    update.set_defaults(run=run_update)

    listing = commands.add_parser("list", help="list indexes")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    _store(listing, "only the indexes in this store (local, or a server's URI)")
    listing.set_defaults(run=run_list)

    show = commands.add_parser("show", help="settings and files of one index")
    show.add_argument("name")
    _store(show, checked)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=run_show)

    remove = commands.add_parser("rm", help="delete an index (your documents are not touched)")
    remove.add_argument("name")
    _store(remove, checked)
    remove.set_defaults(run=run_rm)

    query = commands.add_parser("query", help="show the chunks a question retrieves (no model is asked)")
    query.add_argument("name")
    query.add_argument("text", help="the question or words to look for")
    _store(query, checked)
    query.add_argument("--top-k", type=int, default=4, help="how many chunks, 1 to 20 (default 4)")
    query.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default="hybrid",
                       help="meaning, keywords, or both fused (default hybrid)")
    query.add_argument("--json", action="store_true", help="machine-readable output")
    query.set_defaults(run=run_query)


def _chunking(args: argparse.Namespace) -> ChunkSettings | None:
    """None keeps the index's chunking (or the defaults); a lone --chunk-size gets a fifth of it as overlap."""
    from ..rag import ChunkSettings

    if args.chunk_size is None and args.chunk_overlap is None:
        return None
    size = ChunkSettings().size if args.chunk_size is None else args.chunk_size
    return ChunkSettings(size, size // 5 if args.chunk_overlap is None else args.chunk_overlap)


def run_add(args: argparse.Namespace, settings: Settings) -> int:
    from .. import rag

    progress = TerminalProgress()
    try:
        report = rag.add(settings, args.name, args.paths, embedder=args.embedder, chunking=_chunking(args),
                         rebuild=args.rebuild, progress=progress, store_uri=args.store,
                         token_env=args.store_token_env)
    finally:
        progress.close()
    print(report.summary())
    return 0


def run_update(args: argparse.Namespace, settings: Settings) -> int:
    from .. import rag
    from ..rag.store import check_store

    check_store(settings, args.name, args.store)
    progress = TerminalProgress()
    try:
        report = rag.update(settings, args.name, progress=progress)
    finally:
        progress.close()
    print(report.summary())
    return 0


def _size(n: float | None) -> str:
    if n is None:
        return "on server"
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    from .. import rag
    from ..rag.records import parse_store
    from ..rag.store import store_label

    infos = rag.list_indexes(settings)
    if args.store is not None:
        wanted = store_label(parse_store(args.store))
        infos = [i for i in infos if i.store == wanted]
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(i).items() if k != "sources"} for i in infos], indent=2))
        return 0
    if not infos:
        where = "" if args.store is None else f" in store {args.store}"
        print(f"No indexes{where} under {settings.index_root}. Create one with `sage index add NAME PATH...`.")
        return 0
    rows = [(i.name, i.store, i.files, i.chunks, i.embedder, i.search, _size(i.disk_bytes), i.updated) for i in infos]
    print(table(rows, ("NAME", "STORE", "FILES", "CHUNKS", "EMBEDDER", "SEARCH", "SIZE", "UPDATED")))
    return 0


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    from .. import rag
    from ..rag.store import check_store

    check_store(settings, args.name, args.store)
    info = rag.describe(settings, args.name)
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    size = "on a Milvus server" if info.disk_bytes is None else f"{_size(info.disk_bytes)} on disk"
    print(f"Index {info.name}: {info.files} files, {info.chunks} chunks, {size}")
    print(f"  store      {info.store}")
    print(f"  embedder   {info.embedder} ({info.dim} dimensions, {info.backend} backend)")
    print(f"  chunks     {info.chunk_size} characters, {info.chunk_overlap} overlap; {info.search} vector search")
    print(f"  root       {info.root}")
    print(f"  paths      {' '.join(info.patterns)}")
    print(f"  updated    {info.updated} (created {info.created})")
    if info.sources:
        print()
        print(table([(path, _size(size), chunks) for path, size, chunks in info.sources], ("FILE", "SIZE", "CHUNKS")))
    return 0


def run_rm(args: argparse.Namespace, settings: Settings) -> int:
    from .. import rag
    from ..rag.store import check_store

    check_store(settings, args.name, args.store)
    rag.remove_index(settings, args.name)
    print(f"Removed index {args.name!r}.")
    return 0


def run_query(args: argparse.Namespace, settings: Settings) -> int:
    from .. import rag
    from ..rag.store import check_store

    check_store(settings, args.name, args.store)
    hits = rag.search(settings, args.name, args.text, top_k=args.top_k, mode=args.mode)
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"Nothing in index {args.name!r} matches.")
        return 0
    for n, hit in enumerate(hits, start=1):
        where = f"{hit.source} ({hit.location})" if hit.location else hit.source
        print(f"[{n}] {where}  score {hit.score:.3f}")
        print("    " + "\n    ".join(hit.text.strip().splitlines()))
        print()
    return 0
