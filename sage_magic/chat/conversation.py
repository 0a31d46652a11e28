"""A conversation with one endpoint: history, system prompt, and grounding in a document index.

This is the chat API every face calls (CLI, magics, chat panel). It returns the answer together with its
citations as data, so each face renders them its own way. Retrieved chunks go into the system message as
numbered [n] blocks. What is sent is measured with the server's own tokenizer (/tokenize) against the
model's window, unless a bound every tokenizer respects shows that it fits (:func:`surely_fits`): retrieved
chunks that would overflow it are dropped from the bottom, then the oldest turns of the history, and the
answer says how many of each, instead of the server refusing the request with a 400 nobody explains.
Retrieval comes first because the passages for this question matter more than old turns.
Trimmed turns are forgotten for good, so the model does not remember a turn again later. A question that
cannot fit even alone is refused, never cut.

A cancel (from any thread) or an interrupt keeps the partial answer in the history, marked ``"stopped"``
(a key that is never sent to the model). One ``ask`` at a time per conversation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from ..core.config import Settings
from ..core.errors import SageError
from .client import POLL, ChatClient, StreamInterrupted, StreamResult

T = TypeVar("T")
# (index, query, top_k, mode) -> list[rag.Hit]: in-process by default, a helper process's in a notebook
Search = Callable[[str, str, int, str], list]

# Tokens held back for the chat template's own markers, which /tokenize of the messages already counts
# only approximately on some servers.
_TEMPLATE_MARGIN = 16
# Characters per token assumed before measuring; small byte-level vocabularies average ~2.5-4.
_CHARS_PER_TOKEN = 2.5
# Bounds on what a chat template adds around the messages' text (role markers, separators, BOS, a default
# system line): per message, and once per prompt. Generous on purpose: see :func:`surely_fits`.
_TEMPLATE_TOKENS_PER_MESSAGE = 16
_TEMPLATE_TOKENS = 256


@dataclass
class Answer:
    text: str
    stream: StreamResult
    citations: list = field(default_factory=list)  # list[sage_magic.rag.context.Citation]
    dropped_chunks: int = 0
    context: str | None = None  # the grounding block sent, for --show-context
    trimmed_turns: int = 0  # oldest question/answer pairs dropped from the history to fit the window
    messages: list = field(default_factory=list)  # exactly what was sent: what a correction trains on

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled


class Conversation:
    """Keeps the turns of one chat: ``history`` holds ``{"role", "content"}`` dicts, user then assistant;
    an answer cut short also has ``"stopped": True``."""

    def __init__(self, client: ChatClient, settings: Settings, system_prompt: str | None = None,
                 search: Search | None = None) -> None:
        self.client = client
        self.settings = settings
        self.system_prompt = system_prompt
        self.search: Search = search or self._search_in_process
        self.history: list[dict] = []

    def _search_in_process(self, index: str, query: str, top_k: int, mode: str) -> list:
        from .. import rag

        return rag.search(self.settings, index, query, top_k=top_k, mode=mode)

    def reset(self) -> None:
        self.history.clear()

    def messages_for(self, question: str, grounding: str | None = None,
                     history: list[dict] | None = None) -> list[dict[str, str]]:
        """What is sent for ``question``: system prompt and grounding, ``history`` (default: all of it)."""
        system = "\n\n".join(p for p in (self.system_prompt, grounding) if p)
        head = [{"role": "system", "content": system}] if system else []
        past = self.history if history is None else history
        return head + [{"role": t["role"], "content": t["content"]} for t in past] + [
            {"role": "user", "content": question}]

    def ask(self, question: str, *, index: str | None = None, top_k: int = 4, mode: str = "hybrid",
            max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
            extra: Mapping[str, Any] | None = None, on_delta: Callable[[str], None] | None = None,
            cancel: threading.Event | None = None) -> Answer:
        """Ask one question (grounded in ``index`` when given). ``cancel`` ends it within a fraction of a second
        in every phase and returns what arrived with ``answer.cancelled``; a KeyboardInterrupt keeps the same
        partial answer in the history and then propagates, so a loop of questions can be interrupted.
        ``extra`` holds more request fields (``--param``: top_p, min_tokens, ...), passed to the server as given."""
        if not question.strip():
            raise SageError("The question is empty. Type a question, or /exit to leave.")
        started = time.monotonic()
        prepared = self._nothing_to_prepare(question, index, max_tokens) or _unless_cancelled(
            lambda: self._prepare(question, index, top_k, mode, max_tokens), cancel)
        if prepared is None:
            return Answer("", StreamResult("", None, None, None, None, None, time.monotonic() - started, True))
        grounding, citations, dropped, trimmed = prepared
        del self.history[:2 * trimmed]
        params: dict = {**(extra or {}), "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            params["seed"] = seed
        sent = self.messages_for(question, grounding)
        try:
            result = self.client.stream(sent, on_delta=on_delta, cancel=cancel, **params)
        except StreamInterrupted as interrupt:
            self._remember(question, interrupt.result)
            interrupt.messages = sent
            raise
        self._remember(question, result)
        return Answer(result.text, result, citations, dropped, grounding, trimmed, sent)

    def _remember(self, question: str, result: StreamResult) -> None:
        if result.cancelled and not result.text:
            return  # nothing was answered: a question with an empty answer would only confuse the model
        answer: dict = {"role": "assistant", "content": result.text}
        if result.cancelled:
            answer["stopped"] = True
        self.history += [{"role": "user", "content": question}, answer]

    def _nothing_to_prepare(self, question: str, index: str | None,
                            max_tokens: int) -> tuple[None, list, int, int] | None:
        """What :meth:`_prepare` returns when it would ask nobody anything (no index, a known window the
        conversation surely fits), decided here on the caller's thread; None when it must ask the server or
        retrieve, which runs where a cancel can leave it. Most questions are the first kind, and handing them
        to a thread and back cost a few ms before every request on a busy machine."""
        window = self.client.known_window
        if index is None and window is not None and surely_fits(self.messages_for(question, None), max_tokens, window):
            return None, [], 0, 0
        return None

    def _prepare(self, question: str, index: str | None, top_k: int, mode: str,
                 max_tokens: int) -> tuple[str | None, list, int, int]:
        """Grounding, citations, dropped chunks and turns to trim: everything decided before the request."""
        window = self.client.max_model_len()
        grounding, citations, dropped = None, [], 0
        if index is not None:
            grounding, citations, dropped = self._ground(question, index, top_k, mode, max_tokens, window)
        return grounding, citations, dropped, self._turns_to_trim(question, grounding, max_tokens, window)

    def _turns_to_trim(self, question: str, grounding: str | None, max_tokens: int, window: int | None) -> int:
        """The fewest oldest turns to leave out so that prompt + answer fit the window. A binary search, since
        each probe is one /tokenize call. 0 when the server cannot say (no window, no /tokenize)."""
        if window is None or surely_fits(self.messages_for(question, grounding), max_tokens, window):
            return 0

        def used(drop: int) -> int | None:
            return self.client.count_tokens(self.messages_for(question, grounding, self.history[2 * drop:]))

        turns = len(self.history) // 2
        whole = used(0)
        if whole is None or whole + max_tokens <= window:
            return 0
        alone = used(turns) if turns else whole
        if alone is None:
            return 0
        if alone + max_tokens > window:
            extra = " and ".join(what for what, present in (("its system prompt", self.system_prompt),
                                                            ("its retrieved passages", grounding)) if present)
            raise SageError(
                f"This question needs {alone} prompt tokens{f' with {extra}' if extra else ''} plus up to "
                f"{max_tokens} for the answer, more than the {window}-token window of "
                f"{self.client.endpoint.model!r}, even with no history. Shorten the question, or lower --max-tokens.")
        too_few, enough = 0, turns
        while enough - too_few > 1:
            middle = (too_few + enough) // 2
            tokens = used(middle)
            if tokens is not None and tokens + max_tokens <= window:
                enough = middle
            else:
                too_few = middle
        return enough

    def _ground(self, question: str, index: str, top_k: int, mode: str, max_tokens: int,
                window: int | None) -> tuple[str | None, list, int]:
        """Retrieve, then fit the context into what the model's window leaves after the question and answer
        (the history makes room afterwards)."""
        from ..rag.context import build_context

        hits = self.search(index, question, top_k, mode)
        if window is None:
            context = build_context(hits, budget_chars=10**9)
            return context.system_block, context.citations, context.dropped
        base = self.client.count_tokens(self.messages_for(question, history=[])) or len(question)
        budget = int((window - max_tokens - base - _TEMPLATE_MARGIN) * _CHARS_PER_TOKEN)
        for _ in range(len(hits) + 1):  # measure, and shrink the character budget until the real count fits
            context = build_context(hits, budget_chars=max(budget, 0))
            if not context.citations:
                break
            used = self.client.count_tokens(self.messages_for(question, context.system_block, []))
            if used is None or used + max_tokens <= window:
                break
            # scaled from the block as built, not from the budget: a tokenizer with fewer characters per token
            # than assumed leaves the budget far above the block, and only a budget below it drops a passage
            budget = int(min(budget, len(context.system_block)) * (window - max_tokens) / used * 0.95)
        return context.system_block if context.citations else None, context.citations, context.dropped


def surely_fits(messages: list[dict[str, str]], max_tokens: int, window: int) -> bool:
    """True when these messages plus ``max_tokens`` fit ``window`` whatever the tokenizer, so the /tokenize
    probe (a round trip before every question) can be skipped. No tokenizer of a chat model makes more tokens
    of a text than it has UTF-8 bytes (byte-level BPE and SentencePiece's byte fallback spend at least one byte
    per token), and the template's own tokens are bounded generously; a conversation near the window is
    always measured."""
    text = sum(len(m["content"].encode()) + _TEMPLATE_TOKENS_PER_MESSAGE for m in messages)
    return text + _TEMPLATE_TOKENS + max_tokens <= window


def _unless_cancelled(work: Callable[[], T], cancel: threading.Event | None) -> T | None:
    """``work()``, or None as soon as ``cancel`` is set. Retrieval and /tokenize calls cannot be stopped midway,
    so with a ``cancel`` they run on a worker thread that is left to finish on its own (its result dropped)."""
    if cancel is None:
        return work()
    done = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="sage-chat-prepare").start()
    while not done.wait(POLL):
        if cancel.is_set():
            return None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
