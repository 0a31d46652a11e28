"""The chunker never drops text: properties checked on generated inputs with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_magic.core.errors import SageError
from sage_magic.rag.chunker import ChunkSettings, chunk_spans

texts = st.text(alphabet=st.sampled_from("ab cd.\n\t,!é") | st.characters(), max_size=3000)


@st.composite
def chunkings(draw: st.DrawFn) -> ChunkSettings:
    size = draw(st.integers(min_value=20, max_value=400))
    return ChunkSettings(size, draw(st.integers(min_value=0, max_value=size // 2)))


@settings(max_examples=300, deadline=None)
@given(text=texts, chunking=chunkings())
def test_chunks_cover_every_character_within_size_and_overlap(text: str, chunking: ChunkSettings) -> None:
    spans = chunk_spans(text, chunking)
    covered = [False] * len(text)
    for start, end in spans:
        assert 0 <= start < end <= len(text)
        assert end - start <= chunking.size
        for i in range(start, end):
            covered[i] = True
    assert all(covered)
    if text:
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (a_start, a_end), (b_start, b_end) in zip(spans, spans[1:]):
        assert a_start < b_start <= a_end  # progress, and no gap
        assert a_end - b_start <= chunking.overlap  # shared characters never exceed the overlap
        assert b_end > a_end
        # A line start inside the overlap window wins over a mid-line start (a table row is not cut in two).
        if chunking.overlap and "\n" in text[a_end - chunking.overlap - 1 : a_end - 1]:
            assert text[b_start - 1] == "\n", (text[a_end - chunking.overlap - 1 : a_end], b_start)


def test_cuts_prefer_paragraphs_and_the_overlap_starts_on_a_word() -> None:
    text = ("word " * 30).strip() + "\n\n" + ("next " * 100)
    spans = chunk_spans(text, ChunkSettings(200, 40))
    assert text[: spans[0][1]].endswith("\n\n")
    second = text[spans[1][0] :]
    assert second.startswith(("word", "next"))


def test_default_settings_match_sage() -> None:
    assert (ChunkSettings().size, ChunkSettings().overlap) == (800, 160)


@pytest.mark.parametrize("size, overlap", [(10, 0), (100, 60), (100, -1)])
def test_unusable_settings_are_explained(size: int, overlap: int) -> None:
    with pytest.raises(SageError, match="overlap"):
        ChunkSettings(size, overlap)


def test_chunks_start_on_a_line_when_one_is_near() -> None:
    table = "| option | meaning |\n|---|---|\n" + "".join(
        f"| --flag-{i} | what flag {i} does, or stale) instead of the adapter on its base |\n" for i in range(40))
    spans = chunk_spans(table, ChunkSettings(400, 120))
    assert len(spans) > 5
    for start, _ in spans[1:]:
        assert table[start - 1] == "\n" and table[start] == "|", table[start : start + 40]


def test_chunks_start_on_a_sentence_when_no_line_is_near() -> None:
    prose = " ".join(f"Sentence number {i} says something about the index." for i in range(60))
    spans = chunk_spans(prose, ChunkSettings(300, 100))
    assert len(spans) > 5
    for start, _ in spans[1:]:
        assert prose[start:].startswith("Sentence number"), prose[start : start + 30]
