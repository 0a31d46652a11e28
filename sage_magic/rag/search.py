"""Retrieval: dense (meaning), lexical (words) or both fused with reciprocal rank fusion.

RRF (Cormack et al., 2009) adds 1 / (60 + rank) over the two rankings: it needs no score calibration
between cosine similarities and BM25 scores, and a chunk both searches like wins over one only one likes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import MAX_TOP_K, MIN_TOP_K, Settings
from ..core.errors import SageError
from . import dense, lexical, store
from .embedder import load_embedder

MODES = ("dense", "lexical", "hybrid")
RRF_K = 60
#: Each ranking fused in hybrid mode is this much deeper than top_k, so a chunk ranked lower by one search
#: but high by the other can still surface.
HYBRID_DEPTH = 5


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
    generation = store.open_generation(settings, name)
    ref = store.embedder_for(generation.manifest, settings)  # refuses another model's query vectors
    count = len(generation.chunks)
    if count == 0:
        return []
    depth = top_k * HYBRID_DEPTH if mode == "hybrid" else top_k
    rankings = []
    if mode in ("dense", "hybrid"):
        rankings.append(dense.search(generation.dense, load_embedder(ref).encode([query])[0], depth))
    if mode in ("lexical", "hybrid"):
        rankings.append(lexical.search(generation.lexical, query, depth, count))
    ranked = rrf(rankings)[:top_k] if mode == "hybrid" else rankings[0]
    return [_hit(generation.chunks[row], score) for row, score in ranked]


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


def rrf(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of best-first rankings of (row, score): (row, fused score), best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (row, _) in enumerate(ranking, start=1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def _hit(chunk: store.Chunk, score: float) -> Hit:
    return Hit(source=chunk.source, location=chunk.location, score=score, text=chunk.text, chunk_id=chunk.id)
