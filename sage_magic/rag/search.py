"""Retrieval: dense (meaning), lexical (words) or both fused with reciprocal rank fusion, in whichever store
holds the index (local files or a Milvus server: see store.py); the hits look the same from both.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import MAX_TOP_K, MIN_TOP_K, Settings
from ..core.errors import SageError
from . import store
from .embedder import load_embedder
from .records import Chunk

MODES = ("dense", "lexical", "hybrid")


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk.

    ``source`` is relative to the index's root folder, ``location`` a heading path ("Install > GPU"),
    "cell 3" or "page 2" ("" when the file has no structure). ``score`` is a cosine similarity (dense), a
    BM25 score (lexical) or an RRF score (hybrid): comparable within one result list only.
    """

    source: str
    location: str
    score: float
    text: str
    chunk_id: str


def search(settings: Settings, name: str, query: str, top_k: int = 4, mode: str = "hybrid") -> list[Hit]:
    """The ``top_k`` chunks of index ``name`` best matching ``query``, best first."""
    check_request(query, top_k, mode)
    reader = store.open_reader(settings, name)
    ref = store.embedder_for(reader.manifest, settings)  # refuses another model's query vectors
    if reader.manifest.chunk_count == 0:
        return []
    vector = load_embedder(ref).encode([query])[0] if mode != "lexical" else None
    return [_hit(chunk, score) for chunk, score in reader.search(mode, query, vector, top_k)]


def check_request(query: str, top_k: int, mode: str) -> None:
    """Refuse a query, top_k or mode that no index could answer (cheap: callers check before starting anything)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not MIN_TOP_K <= top_k <= MAX_TOP_K:
        raise SageError(
            f"top_k must be a whole number from {MIN_TOP_K} to {MAX_TOP_K}, not {top_k!r}; 4 is a good start."
        )
    if mode not in MODES:
        raise SageError(f"Unknown search mode {mode!r}: use dense, lexical or hybrid (the default).")
    if not isinstance(query, str) or not query.strip():
        raise SageError("The query is empty: ask a question or give a few words to look for.")


def _hit(chunk: Chunk, score: float) -> Hit:
    return Hit(source=chunk.source, location=chunk.location, score=score, text=chunk.text, chunk_id=chunk.id)
