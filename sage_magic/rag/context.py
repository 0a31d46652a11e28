"""Turning retrieved chunks into a system-prompt block the model can cite, within a size budget.

The chat engine owns the prompt; this module only decides what the retrieved part says and which
citation numbers mean which sources, so the answer's ``[n]`` can be shown as links afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .search import Hit

INSTRUCTION = (
    "Answer using the numbered sources below when they are relevant, and cite them as [n] right after the "
    "sentence that uses them. If they do not contain the answer, say so instead of guessing.\n"
)


@dataclass(frozen=True)
class Citation:
    """What ``[n]`` in an answer refers to."""

    n: int
    source: str
    location: str
    score: float
    text: str = ""  # the passage itself, so a face can show where the answer came from


@dataclass(frozen=True)
class GroundedContext:
    """The retrieved part of a system prompt; ``dropped`` hits did not fit the budget."""

    system_block: str
    citations: list[Citation] = field(default_factory=list)
    dropped: int = 0


def build_context(hits: Sequence[Hit], budget_chars: int) -> GroundedContext:
    """Number the hits [1], [2]... in order and keep as many whole ones as fit in ``budget_chars``.

    The budget covers the whole block, instruction included. Hits are kept whole or dropped from the
    bottom (the best come first), never cut: half a chunk invites a confident half answer. With no hit,
    or none that fits, the block is empty.
    """
    blocks: list[str] = []
    citations: list[Citation] = []
    used = len(INSTRUCTION)
    for hit in hits:
        n = len(citations) + 1
        header = f"[{n}] {hit.source}" + (f" ({hit.location})" if hit.location else "")
        block = f"\n{header}\n{hit.text.strip()}\n"
        if used + len(block) > budget_chars:
            break
        used += len(block)
        blocks.append(block)
        citations.append(Citation(n, hit.source, hit.location, hit.score, hit.text.strip()))
    if not citations:
        return GroundedContext("", [], len(hits))
    return GroundedContext(INSTRUCTION + "".join(blocks), citations, len(hits) - len(citations))
