"""Progress events: the one channel through which long operations talk to whichever face is showing them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional


@dataclass(frozen=True)
class Progress:
    """One step of a long operation.

    ``phase`` is a short stable word faces can switch on (``merge``, ``launch``, ``load``, ``ready``,
    ``port``, ``index``...); ``fraction`` is 0..1 when the operation knows how far it is, else ``None``.
    ``data`` carries the structured figures behind the message (training: step, epoch, loss, eval loss,
    ETA) so that a face can plot them instead of parsing text; ``None`` for events that have none.
    """

    phase: str
    message: str
    fraction: Optional[float] = None
    data: Optional[Mapping[str, Any]] = None


ProgressCallback = Callable[[Progress], None]


def silent(_: Progress) -> None:
    """The default callback: report nothing."""
