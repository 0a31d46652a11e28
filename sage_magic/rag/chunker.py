"""Cutting a section into overlapping chunks small enough to embed, without ever losing a character.

Cuts prefer natural boundaries (paragraph, line, sentence, word) inside the allowed window, and the next
chunk starts at most ``overlap`` characters before the cut, on the best boundary of that overlap window (a
paragraph, line, sentence or word start, in that order), so it begins where a reader would, and a sentence
split by a cut is still whole in one of the two chunks. Spans, not strings, are returned: the
property "chunks cover every character" is then a statement about integers a test can check.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import SageError

DEFAULT_CHUNK_SIZE = 800
DEFAULT_OVERLAP = 160

#: Boundaries tried in order, best first: the cut goes right after the last one found in the window.
_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", "\t")
#: Where a following chunk may start, best kind first: a paragraph, a line, a sentence, a word.
_STARTS = (("\n\n",), ("\n",), (". ", "? ", "! "), (" ", "\t"))


@dataclass(frozen=True)
class ChunkSettings:
    """How an index cuts text; stored in its manifest because changing it means re-embedding everything."""

    size: int = DEFAULT_CHUNK_SIZE
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.size < 20 or not 0 <= self.overlap <= self.size // 2:
            raise SageError(
                f"Chunk size {self.size} with overlap {self.overlap} is not usable: the size must be at least 20 "
                "characters and the overlap between 0 and half the size (defaults: 800 and 160)."
            )


def chunk_spans(text: str, settings: ChunkSettings) -> list[tuple[int, int]]:
    """(start, end) spans of ``text``: each at most ``settings.size`` long, consecutive ones overlapping by at
    most ``settings.overlap`` characters, together covering every character (an empty text has no span)."""
    size, overlap = settings.size, settings.overlap
    spans: list[tuple[int, int]] = []
    start = 0
    while len(text) - start > size:
        limit = start + size
        # A cut must leave the next chunk (which starts `overlap` before it) strictly after this one's start.
        earliest = start + overlap + 1
        cut = limit
        for mark in _BREAKS:
            found = text.rfind(mark, earliest, limit)
            if found != -1:
                cut = found + len(mark)
                break
        spans.append((start, cut))
        start = _next_start(text, cut - overlap, cut) if overlap else cut
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _next_start(text: str, earliest: int, cut: int) -> int:
    """Where the chunk after a cut begins: the earliest paragraph start in ``[earliest, cut]``, else the earliest
    line start, sentence start or word start there (in that order), else ``earliest`` itself.

    Earliest keeps as much overlap as allowed; the kind comes first, so a chunk starts on a whole line rather
    than mid-row of a table when the overlap window holds a line start.
    """
    for marks in _STARTS:
        found = [i + len(mark) for mark in marks if (i := text.find(mark, max(0, earliest - len(mark)), cut)) != -1]
        if found:
            return min(found)
    return earliest
