"""Named, incremental document indexes with hybrid search and citations (the engine's RAG part).

Importing this package is cheap: ONNX Runtime or torch, sentence-transformers, FAISS, bm25s, numpy and pypdf
load inside the functions that need them, the first time an index is built or queried.

Typical use::

    from sage_magic import rag
    rag.add(settings, "docs", ["./docs"])              # or rag.update(settings, "docs") later
    hits = rag.search(settings, "docs", "How do I use a GPU?", top_k=4)
    context = rag.build_context(hits, budget_chars=6000)
    service = rag.SearchService(settings)              # the same search from a helper process: the caller
    hits = service.search("docs", "GPU?")              # never imports torch (what a notebook kernel uses)
"""

from importlib import import_module
from typing import Any

# search is imported now: a lazy name would lose to the submodule of the same name once it is imported
from .search import MODES, Hit, search

#: Where each other public name lives. Resolved on first use (PEP 562), so a kernel whose question needs
#: only the search constants and the helper-process client never imports the indexer, loaders or chunker.
_HOME = {
    "ChunkSettings": "chunker", "Citation": "context", "GroundedContext": "context", "build_context": "context",
    "UpdateReport": "indexer", "add": "indexer", "update": "indexer", "SearchService": "service",
    "IndexInfo": "store", "describe": "store", "index_exists": "store", "list_indexes": "store",
    "remove_index": "store",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "MODES",
    "SearchService",
    "ChunkSettings",
    "Citation",
    "GroundedContext",
    "Hit",
    "IndexInfo",
    "UpdateReport",
    "add",
    "build_context",
    "describe",
    "index_exists",
    "list_indexes",
    "remove_index",
    "search",
    "update",
]
