"""Terminal progress lines; tables come from faces/text.py, shared with the notebook."""

from __future__ import annotations

import sys
from typing import TextIO

from ..core.progress import Progress


class TerminalProgress:
    """A progress callback that draws a one-line bar on a TTY and plain lines elsewhere (logs, CI)."""

    def __init__(self, stream: TextIO | None = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._tty = self.stream.isatty()
        self._open_line = False

    def __call__(self, event: Progress) -> None:
        if event.fraction is not None:
            filled = int(round(self.width * max(0.0, min(1.0, event.fraction))))
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {event.fraction * 100:5.1f}% "
        else:
            bar = ""
        text = f"{bar}{event.phase}: {event.message}"
        if self._tty:
            self.stream.write("\r\x1b[2K" + text)
            self._open_line = event.fraction is not None and event.fraction < 1.0
            if not self._open_line:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

