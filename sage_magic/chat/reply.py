"""The answer a notebook keeps: a ``str`` that also carries where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Reply(str):
    """An answer as the notebook keeps it: ``str(reply)`` is the text, the rest rides along.

    A ``str`` subclass so that ``-o answer`` gives a variable that prints, slices and formats like the text,
    while ``answer.model``, ``answer.citations`` and ``answer.metrics`` keep where it came from.

    ``feedback`` is the situation the answer was given in (the messages sent, the fine-tune and its
    fingerprint, the SAGE home), so that :meth:`rate` and :meth:`correct` can store a mark that trains on
    exactly what the model saw, from any face and long after the cell ran. None for a comparison's answers.
    """

    model: str
    citations: list[dict]
    metrics: dict[str, Any]
    cancelled: bool
    prompt: str
    feedback: dict[str, Any] | None

    def __new__(cls, text: str, *, model: str, prompt: str, citations: list[dict] | None = None,
                metrics: dict[str, Any] | None = None, cancelled: bool = False,
                feedback: dict[str, Any] | None = None) -> "Reply":
        reply = super().__new__(cls, text)
        reply.model = model
        reply.prompt = prompt
        reply.citations = list(citations or [])
        reply.metrics = dict(metrics or {})
        reply.cancelled = cancelled
        reply.feedback = feedback
        return reply

    def __getnewargs_ex__(self) -> tuple[tuple[str], dict[str, Any]]:
        """What ``copy``, ``deepcopy`` and ``pickle`` (``%store``, multiprocessing) rebuild a reply from: the
        keyword-only ``__new__`` above is not str's, so the default (the text alone) cannot call it."""
        return (self.text,), {"model": self.model, "prompt": self.prompt, "citations": self.citations,
                              "metrics": self.metrics, "cancelled": self.cancelled, "feedback": self.feedback}

    @property
    def text(self) -> str:
        return str.__str__(self)

    def provenance(self) -> dict[str, Any]:
        """What the output metadata and the exported transcript record about this answer."""
        return {"model": self.model, "cancelled": self.cancelled, "citations": self.citations, **self.metrics}

    def rate(self, rating: str) -> dict[str, Any]:
        """Mark this answer "good" or "bad" in the feedback store; returns the stored mark."""
        return self.mark(rating=rating)

    def correct(self, text: str) -> dict[str, Any]:
        """Store ``text`` as the answer the model should have given (the model's own answer is kept beside)."""
        return self.mark(correction=text)

    def mark(self, *, rating: str | None = None, correction: str | None = None) -> dict[str, Any]:
        """Store a rating and/or a correction of this answer as one mark; returns it."""
        from ..core.errors import SageError
        from ..feedback.store import FeedbackStore

        if self.feedback is None:
            raise SageError("This answer cannot be marked: it came from a comparison or an older sage_magic. "
                            "Ask the model alone and mark that answer.")
        return FeedbackStore(Path(self.feedback["home"])).add(self.feedback, rating=rating, correction=correction)
