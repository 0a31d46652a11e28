"""Grounded chat end to end: the project's own READMEs indexed with the real MiniLM embedder, questions
answered by a demo fine-tune through real vLLM, and the file holding the answer named in the citations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sage_magic import rag
from tests.conftest import env_for

pytestmark = [pytest.mark.rag]

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = {
    "How are cold-start pairs of the bare server and the manager alternated when timing readiness?":
        "benchmarks/README.md",
    "Which environment variable sets how long a server outlives its last owner?": "README.md",
}


@pytest.fixture(scope="module")
def indexed(settings):
    out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "index", "add", "project", "README.md",
                          "benchmarks/README.md"], cwd=REPO, env=env_for(settings), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return settings


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
@pytest.mark.parametrize("question,expected", QUESTIONS.items())
def test_the_file_with_the_answer_is_in_the_top_3(indexed, mode: str, question: str, expected: str) -> None:
    hits = rag.search(indexed, "project", question, top_k=3, mode=mode)
    assert expected in [h.source for h in hits]


def _chat(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "chat", "--finetune-model", "demo_expert",
                           *args], cwd=REPO, env=env_for(settings), capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


@pytest.mark.vllm
@pytest.mark.parametrize("question,expected", QUESTIONS.items())
def test_sage_chat_with_index_cites_the_file(indexed, expert, question: str, expected: str) -> None:
    out = _chat(indexed, "--index", "project", "--top-k", "3", "--ask", question)
    assert out.returncode == 0, out.stderr
    answer, _, table = out.stdout.partition("\nref")
    assert answer.strip()  # the fine-tune answered (grounding changes its input, so not its trained phrase)
    rows = [line.split() for line in table.splitlines()[1:] if line.startswith("[")]
    assert rows and expected in [row[1] for row in rows]
    assert [row[0] for row in rows] == [f"[{n}]" for n in range(1, len(rows) + 1)]


@pytest.mark.vllm
def test_chunks_that_would_overflow_the_context_are_dropped_and_said(indexed, expert) -> None:
    # the demo model has a 2048-token window: 1,700 tokens of answer leave room for very few passages
    out = _chat(indexed, "--index", "project", "--top-k", "20", "--max-tokens", "1700", "--ask",
                "What does sage ps show?")
    assert out.returncode == 0, out.stderr
    assert "dropped" in out.stdout and "would not fit" in out.stdout


@pytest.mark.vllm
def test_engine_chat_api_returns_citations_as_data(indexed, expert) -> None:
    from sage_magic.chat.client import ChatClient
    from sage_magic.chat.conversation import Conversation

    conversation = Conversation(ChatClient(expert), indexed)
    question, expected = next(iter(QUESTIONS.items()))
    answer = conversation.ask(question, index="project", top_k=3)
    assert answer.text and not answer.cancelled and answer.dropped_chunks == 0
    assert expected in [c.source for c in answer.citations]
    assert [c.n for c in answer.citations] == list(range(1, len(answer.citations) + 1))
    assert answer.context and all(f"[{c.n}]" in answer.context for c in answer.citations)
    # the grounded turn is in the history like any other
    assert conversation.history[-2:] == [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer.text}]
