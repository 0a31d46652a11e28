"""Server logs: private, findable by id after the server is gone, and not kept for ever.

A failed start says "`sage logs ID` shows more", which must still work once the registry record is gone, so
logs live beside the registry (``<runtime>/logs/<id>.log``) and outlive their server. Each starts with a
header naming what the server served, which is what `sage logs` lists. At every launch the logs of finished
servers are pruned: the newest :data:`KEEP_LOGS` stay, and none older than :data:`KEEP_SECONDS`. They are
created 0600 (vLLM logs paths and arguments; our own lines name models).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import NotFound, SageError
from .registry import Registry

KEEP_LOGS = 20
KEEP_SECONDS = 7 * 24 * 3600
_HEADER = "[sage_magic] server "


@dataclass(frozen=True)
class LogEntry:
    """One server log, as `sage logs` lists it."""

    server_id: str
    path: Path
    modified: float
    size: int
    running: bool
    about: str  # "<served name> (<kind>) from <model path>", from the header; "" for a log without one


def create(path: Path, server_id: str, about: str) -> None:
    """A new log, 0600, whose first line says what the server serves (read back by :func:`entries`)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "w") as log:
        log.write(f"{_HEADER}{server_id}: {about} (started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")


def entries(registry: Registry) -> list[LogEntry]:
    """Every server log, newest first."""
    if not registry.logs.is_dir():
        return []
    running = {r.id for r in registry.all()}
    found = []
    for path in registry.logs.glob("*.log"):
        try:
            st = path.stat()
            with open(path, errors="replace") as handle:
                first = handle.readline()
        except OSError:
            continue  # pruned meanwhile
        about = first.split(": ", 1)[1].rsplit(" (started", 1)[0] if first.startswith(_HEADER) else ""
        found.append(LogEntry(path.stem, path, st.st_mtime, st.st_size, path.stem in running, about))
    return sorted(found, key=lambda e: e.modified, reverse=True)


def log_tail(path: str | Path, lines: int) -> str:
    """The last ``lines`` lines of a log, or "(no log)" when it cannot be read."""
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def find(registry: Registry, target: str) -> Path:
    """The log of a running server (id, prefix or served name), or of a finished one (id or prefix)."""
    try:
        return Path(registry.find(target).log_path)
    except NotFound:
        pass
    matches = [e for e in entries(registry) if e.server_id.startswith(target)]
    if len(matches) == 1:
        return matches[0].path
    if not matches:
        raise NotFound(f"No server log matches {target!r}: logs are kept for the {KEEP_LOGS} newest servers "
                       f"and at most {KEEP_SECONDS // 86400} days. `sage logs` lists the ones there are.")
    raise SageError(f"{target!r} matches the logs of several servers ({', '.join(e.server_id for e in matches)}). "
                    "Give more of the id.")


def prune(registry: Registry, keep: int = KEEP_LOGS, max_age: float = KEEP_SECONDS) -> list[str]:
    """Delete the logs of finished servers beyond the newest ``keep`` or older than ``max_age`` seconds;
    return their ids. A running server's log is never touched."""
    now = time.time()
    finished = [e for e in entries(registry) if not e.running]
    doomed = [e for rank, e in enumerate(finished) if rank >= keep or now - e.modified > max_age]
    for entry in doomed:
        entry.path.unlink(missing_ok=True)
    return [e.server_id for e in doomed]
