"""A conversation with one endpoint: history, system prompt, and grounding in a document index.

This is the chat API every face calls (CLI, magics, chat panel). It returns the answer together with its
citations as data, so each face renders them its own way. Retrieved chunks go into the system message as
numbered [n] blocks; chunks that would overflow the model's context are dropped from the bottom, and the
answer says how many, instead of the server truncating silently or refusing the request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from .client import ChatClient, StreamResult
from .config import Settings
from .errors import SageError

DEFAULT_INDEX = "docs-public"  # SAGE's default index name
# Tokens held back for the chat template's own markers, which /tokenize of the messages already counts
# only approximately on some servers.
_TEMPLATE_MARGIN = 16
# Characters per token assumed before measuring; small byte-level vocabularies average ~2.5-4.
_CHARS_PER_TOKEN = 2.5


@dataclass
class Answer:
    text: str
    stream: StreamResult
    citations: list = field(default_factory=list)  # list[sage_magic.rag.context.Citation]
    dropped_chunks: int = 0
    context: str | None = None  # the grounding block sent, for --show-context

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled


class Conversation:
    """Keeps the turns of one chat. ``max_turns`` bounds what is re-sent (0 = no memory)."""

    def __init__(self, client: ChatClient, settings: Settings, system_prompt: str | None = None,
                 max_turns: int | None = None) -> None:
        self.client = client
        self.settings = settings
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history.clear()

    def messages_for(self, question: str, grounding: str | None = None) -> list[dict[str, str]]:
        system = "\n\n".join(p for p in (self.system_prompt, grounding) if p)
        past = self.history if self.max_turns is None else self.history[len(self.history) - 2 * self.max_turns:]
        if self.max_turns == 0:
            past = []
        head = [{"role": "system", "content": system}] if system else []
        return head + past + [{"role": "user", "content": question}]

    def ask(self, question: str, *, index: str | None = None, top_k: int = 4, mode: str = "hybrid",
            max_tokens: int = 256, temperature: float = 0.0, on_delta: Callable[[str], None] | None = None,
            cancel: threading.Event | None = None) -> Answer:
        """Ask one question (grounded in ``index`` when given); the turn is kept even if cancelled."""
        if not question.strip():
            raise SageError("The question is empty. Type a question, or /exit to leave.")
        citations: list = []
        dropped = 0
        grounding = None
        if index is not None:
            grounding, citations, dropped = self._ground(question, index, top_k, mode, max_tokens)
        messages = self.messages_for(question, grounding)
        result = self.client.stream(messages, on_delta=on_delta, cancel=cancel, max_tokens=max_tokens,
                                    temperature=temperature)
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.text}]
        return Answer(result.text, result, citations, dropped, grounding)

    def _ground(self, question: str, index: str, top_k: int, mode: str, max_tokens: int) -> tuple[str, list, int]:
        """Retrieve, then fit the context into what the model's window leaves after history and answer."""
        from . import rag
        from .rag.context import build_context

        hits = rag.search(self.settings, index, question, top_k=top_k, mode=mode)
        window = self.client.max_model_len()
        if window is None:
            context = build_context(hits, budget_chars=10**9)
            return context.system_block, context.citations, context.dropped
        base = self.client.count_tokens(self.messages_for(question)) or len(question)
        budget = int((window - max_tokens - base - _TEMPLATE_MARGIN) * _CHARS_PER_TOKEN)
        for _ in range(4):  # measure, and shrink the character budget until the real token count fits
            context = build_context(hits, budget_chars=max(budget, 0))
            if not context.citations:
                break
            used = self.client.count_tokens(self.messages_for(question, context.system_block))
            if used is None or used + max_tokens <= window:
                break
            budget = int(budget * (window - max_tokens) / used * 0.95)
        return context.system_block if context.citations else None, context.citations, context.dropped
