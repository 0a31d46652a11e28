"""One display in a cell, updated in place while something streams or trains."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.progress import Progress


def publish(shell: Any, bundle: dict[str, Any], metadata: dict | None = None) -> None:
    """Show a bundle through the shell's own publisher (any shell, not only the singleton one)."""
    shell.display_pub.publish(data=bundle, metadata=metadata or {})


class LiveOutput:
    """One display in the cell, updated in place: progress, then the streaming text, then the answer.

    Updates are throttled to ``interval`` seconds, so a fast stream costs a few dozen display messages,
    not one per token. It publishes through the shell's own display publisher (works in any shell, not only
    the singleton one ``IPython.display`` assumes).
    """

    def __init__(self, shell: Any, interval: float) -> None:
        self.publisher = shell.display_pub
        self.interval = interval
        import secrets  # not uuid: it imports platform, ~3 ms of a fresh kernel's first question

        self.display_id = secrets.token_hex(16)
        self.shown = False
        self.updates = 0
        self.parts: list[str] = []
        self.started = time.monotonic()
        self._last = 0.0
        self._phase = ""

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True

    def show(self, bundle: dict[str, Any], metadata: dict | None = None) -> None:
        self.publisher.publish(data=bundle, metadata=metadata or {}, transient={"display_id": self.display_id},
                               update=self.shown)
        self.shown = True
        self.updates += 1

    def progress(self, event: "Progress") -> None:
        from . import render

        if event.phase == "warning":  # a display of its own that stays: the next progress line replaces this one's
            self.publisher.publish(data=render.progress(event, time.monotonic() - self.started), metadata={})
            return
        if event.phase != self._phase or self.due():
            self._phase = event.phase
            self.show(render.progress(event, time.monotonic() - self.started))

    def delta(self, text: str) -> None:
        from . import render

        self.parts.append(text)
        if self.due():
            self.show(render.streaming("".join(self.parts)))

    def stopped(self) -> None:
        """After a kernel interrupt: keep what streamed, marked as stopped."""
        from . import render

        text = "".join(self.parts)
        self.show({"text/plain": text + " [stopped]",
                   render.MIME: render.pre(text) + "<p><strong>(stopped: partial answer)</strong></p>"})
