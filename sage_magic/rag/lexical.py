"""BM25 keyword search (bm25s): it finds exact names, flags and error codes that embeddings blur.

BM25 scores depend on corpus-wide statistics (document frequencies, mean length), so the index is
rebuilt from all chunk texts for each generation; bm25s does that in about a second per 10k chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bm25s


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def build(texts: Sequence[str]) -> bm25s.BM25:
    """A BM25 index whose document numbers are the rows of ``texts``."""
    import bm25s

    index = bm25s.BM25()
    index.index(_tokenize(texts), show_progress=False)
    return index


def save(index: bm25s.BM25, folder: Path) -> None:
    index.save(str(folder), show_progress=False)


def load(folder: Path) -> bm25s.BM25:
    import bm25s

    return bm25s.BM25.load(str(folder), show_progress=False)


def search(index: bm25s.BM25, query: str, k: int, count: int) -> list[tuple[int, float]]:
    """The ``k`` best (row, BM25 score) pairs among ``count`` documents; rows sharing no word are left out."""
    tokens = _tokenize([query])
    if not tokens[0] or count == 0:
        return []
    rows, scores = index.retrieve(tokens, k=min(k, count), show_progress=False, n_threads=1)
    return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0]
