"""Named, incremental document indexes with hybrid search and citations (the engine's RAG part).

Importing this package is cheap: torch, sentence-transformers, FAISS, bm25s, numpy and pypdf load inside
the functions that need them, the first time an index is built or queried.

Typical use::

    from sage_magic import rag
    rag.add(settings, "docs", ["./docs"])              # or rag.update(settings, "docs") later
    hits = rag.search(settings, "docs", "How do I use a GPU?", top_k=4)
    context = rag.build_context(hits, budget_chars=6000)
    service = rag.SearchService(settings)              # the same search from a helper process: the caller
    hits = service.search("docs", "GPU?")              # never imports torch (what a notebook kernel uses)
"""

from .chunker import ChunkSettings
from .context import Citation, GroundedContext, build_context
from .indexer import UpdateReport, add, update
from .search import MODES, Hit, search
from .service import SearchService
from .store import IndexInfo, describe, index_exists, list_indexes, remove_index

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
