"""The answer a notebook keeps: a ``str`` that also carries where it came from."""

from __future__ import annotations

from typing import Any


class Reply(str):
    """An answer as the notebook keeps it: ``str(reply)`` is the text, the rest rides along.

    A ``str`` subclass so that ``-o answer`` gives a variable that prints, slices and formats like the text,
    while ``answer.model``, ``answer.citations`` and ``answer.metrics`` keep where it came from.
    """

    model: str
    citations: list[dict]
    metrics: dict[str, Any]
    cancelled: bool
    prompt: str

    def __new__(cls, text: str, *, model: str, prompt: str, citations: list[dict] | None = None,
                metrics: dict[str, Any] | None = None, cancelled: bool = False) -> "Reply":
        reply = super().__new__(cls, text)
        reply.model = model
        reply.prompt = prompt
        reply.citations = list(citations or [])
        reply.metrics = dict(metrics or {})
        reply.cancelled = cancelled
        return reply

    def __getnewargs_ex__(self) -> tuple[tuple[str], dict[str, Any]]:
        """What ``copy``, ``deepcopy`` and ``pickle`` (``%store``, multiprocessing) rebuild a reply from: the
        keyword-only ``__new__`` above is not str's, so the default (the text alone) cannot call it."""
        return (self.text,), {"model": self.model, "prompt": self.prompt, "citations": self.citations,
                              "metrics": self.metrics, "cancelled": self.cancelled}

    @property
    def text(self) -> str:
        return str.__str__(self)

    def provenance(self) -> dict[str, Any]:
        """What the output metadata and the exported transcript record about this answer."""
        return {"model": self.model, "cancelled": self.cancelled, "citations": self.citations, **self.metrics}
