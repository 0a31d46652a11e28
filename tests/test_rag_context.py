"""Citation blocks for the chat engine and rank fusion: pure functions, no index needed."""

from __future__ import annotations

import dataclasses

import pytest

from sage_magic.rag import Citation, GroundedContext, Hit, build_context
from sage_magic.rag.context import INSTRUCTION
from sage_magic.rag.local import rrf


def hit(n: int, text: str = "x" * 100, location: str = "Install > GPU") -> Hit:
    return Hit(source=f"doc{n}.md", location=location, score=1.0 / n, text=text, chunk_id=f"doc{n}.md:abc:0")


def test_numbered_blocks_with_source_location_and_instruction() -> None:
    context = build_context([hit(1), hit(2, location="")], budget_chars=10_000)
    assert context.system_block.startswith(INSTRUCTION)
    assert "[1] doc1.md (Install > GPU)\n" + "x" * 100 in context.system_block
    assert "[2] doc2.md\n" in context.system_block
    assert context.citations == [Citation(1, "doc1.md", "Install > GPU", 1.0, "x" * 100),  # with its passage
                                 Citation(2, "doc2.md", "", 0.5, "x" * 100)]
    assert context.dropped == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.citations[0].n = 3  # type: ignore[misc]


def test_budget_drops_whole_hits_from_the_bottom() -> None:
    hits = [hit(n) for n in range(1, 6)]
    full = build_context(hits, budget_chars=10_000)
    one_block = (len(full.system_block) - len(INSTRUCTION)) // 5
    context = build_context(hits, budget_chars=len(INSTRUCTION) + 2 * one_block + 10)
    assert [c.n for c in context.citations] == [1, 2]
    assert context.dropped == 3
    assert len(context.system_block) <= len(INSTRUCTION) + 2 * one_block + 10


def test_nothing_fits_or_nothing_found_gives_an_empty_block() -> None:
    assert build_context([hit(1)], budget_chars=50) == GroundedContext("", [], 1)
    assert build_context([], budget_chars=1000).system_block == ""


def test_rrf_rewards_agreement() -> None:
    fused = rrf([[(1, 0.9), (2, 0.8), (3, 0.7)], [(3, 9.0), (4, 5.0), (1, 1.0)]])
    assert [row for row, _ in fused][:2] == [1, 3]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63)


class _DenseTokenizer:
    """A client whose tokenizer makes 1.25 characters a token, as the demo model's does: far denser than the
    2.5 the budget first assumes. No server: only the window and /tokenize's count matter here."""

    endpoint = type("E", (), {"model": "tiny"})()

    def max_model_len(self) -> int:
        return 2048

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return int(sum(len(m["content"]) for m in messages) / 1.25) + 8


def test_passages_are_dropped_until_the_real_token_count_fits_the_window(tmp_path) -> None:
    """Three ~710-character passages need just over the 1,792 tokens left here: the question must still be
    asked, with the lowest-ranked passages dropped (and counted), never refused for its grounding."""
    from sage_magic.chat.conversation import Conversation
    from sage_magic.core.config import Settings

    hits = [hit(n, text=f"passage {n} " + "y" * 700) for n in range(1, 4)]
    client = _DenseTokenizer()
    conversation = Conversation(client, Settings.from_env(environ={}, home=tmp_path),
                                search=lambda index, query, top_k, mode: hits)
    grounding, citations, dropped, trimmed = conversation._prepare("Which variable?", "docs", 3, "hybrid", 256)
    assert citations and dropped == 3 - len(citations) and dropped >= 1 and trimmed == 0
    assert client.count_tokens(conversation.messages_for("Which variable?", grounding, [])) + 256 <= 2048
