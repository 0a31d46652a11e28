"""The feedback store: every rating and correction, append-only, one JSON-lines file per fine-tune.

Layout: ``$SAGE_HOME/feedback/NAME.jsonl`` (NAME the fine-tune; answers of a plain model go to
``model-MODEL.jsonl``), the folder 0700 and the files 0600: it holds prompts and answers, the user's own.

Why append-only lines: a mark must survive whatever happens right after it (a kernel killed, a crash in the
next cell), and must never cost an earlier one. Each mark is one complete line written with one ``write`` on
an ``O_APPEND`` descriptor, so a killed process leaves every earlier line whole, and the data is in the
kernel's page cache the moment the call returns. The ``fsync`` that carries it through a power cut runs on a
background thread, off the notebook's event loop (a sync can take tens of milliseconds on a busy disk). A
reader skips a line that a power cut tore, and counts it; the next mark starts on a fresh line after it.
Removal (``sage feedback rm``) rewrites a file atomically under the same lock the appends take, so no mark
written meanwhile is lost.

A mark holds the whole situation the answer was given in: the messages sent to the model (system prompt,
retrieved passages, the conversation before the turn, the question), the answer, the model and its
fingerprint, the time and the notebook. Several marks of one turn (rated, then corrected) share its
``turn`` id; :func:`fold` keeps the latest rating and the latest correction of each.
"""

from __future__ import annotations

import gc
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.errors import SageError
from ..core.files import exclusive, utc_now, write_bytes_atomic

FOLDER = "feedback"
RATINGS = ("good", "bad")
#: What a turn must carry to be marked (see ``Reply.feedback_context``).
TURN_KEYS = ("turn", "model", "finetune", "fingerprint", "prompt", "answer", "messages", "citations")

_sync_lock = threading.Lock()
_syncer: ThreadPoolExecutor | None = None


def _sync_later(path: Path) -> None:
    """fsync ``path`` on the store's one background thread (created on first use, joined at exit)."""
    global _syncer
    with _sync_lock:
        if _syncer is None:
            _syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sage-feedback-sync")
        _syncer.submit(_fsync, path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # removed meanwhile: nothing left to carry through a power cut
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_key(finetune: str | None, model: str) -> str:
    """The file a turn's marks go to: the fine-tune's name, else ``model-`` and the model, made file-safe."""
    return finetune if finetune else "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model)


class FeedbackStore:
    """The marks under one SAGE home. Safe across threads and processes (every write holds one flock)."""

    def __init__(self, home: Path) -> None:
        self.root = Path(home) / FOLDER

    def _ready(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _lock(self):
        return exclusive(self.root / ".lock")

    def add(self, turn: Mapping[str, Any], *, rating: str | None = None, correction: str | None = None,
            notebook: str | None = None) -> dict[str, Any]:
        """Store one mark of ``turn`` (see :data:`TURN_KEYS`) and return it. At least one of ``rating`` and
        ``correction`` is given; the call returns once the line is written (the fsync follows in the background)."""
        if rating is not None and rating not in RATINGS:
            raise SageError(f"A rating is 'good' or 'bad', not {rating!r}.")
        if correction is not None and not correction.strip():
            raise SageError("The correction is empty. Write the answer the model should have given.")
        if rating is None and correction is None:
            raise SageError("Nothing to store: give a rating ('good' or 'bad') or a correction.")
        missing = [key for key in TURN_KEYS if key not in turn]
        if missing:
            raise SageError(f"This answer cannot be marked: it carries no {', '.join(missing)} (an answer from "
                            "an older sage_magic, or a comparison). Ask again and mark the new answer.")
        mark = {"id": secrets.token_hex(6), "time": utc_now(), "rating": rating, "correction": correction,
                **{key: turn[key] for key in TURN_KEYS},
                "notebook": notebook if notebook is not None else os.environ.get("JPY_SESSION_NAME")}
        line = (json.dumps(mark, ensure_ascii=False) + "\n").encode()
        self._ready()
        path = self.root / f"{file_key(turn['finetune'], turn['model'])}.jsonl"
        with self._lock():
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a torn line at the end (a power cut): never glue this mark onto it
                written = os.write(fd, line)
                while written < len(line):  # a regular file takes it whole; a full disk may not
                    written += os.write(fd, line[written:])
            finally:
                os.close(fd)
        _sync_later(path)
        return mark

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*.jsonl")) if self.root.is_dir() else []

    def marks(self, finetune: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Every mark (of ``finetune``'s file only, when given) in the order written, and how many torn lines
        (a power cut in the middle of a write) were skipped."""
        paths = [self.root / f"{finetune}.jsonl"] if finetune else self.files()
        marks, torn = [], 0
        with paused_gc():
            for path in paths:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    continue
                with handle:
                    for line in handle:
                        try:
                            marks.append(json.loads(line))
                        except ValueError:
                            torn += 1
        return marks, torn

    def remove(self, *, ids: Iterable[str] = (), finetune: str | None = None,
               older_than_days: float | None = None) -> int:
        """Remove the marks with these ids, or of this fine-tune, or older than this many days (several
        criteria: a mark matching any goes). Each file is rewritten atomically; returns how many went."""
        wanted = set(ids)
        if not wanted and finetune is None and older_than_days is None:
            raise SageError("Say which marks to remove: ids, --finetune NAME or --older-than DAYS.")
        cutoff = None
        if older_than_days is not None:
            cutoff = datetime.now(timezone.utc).timestamp() - older_than_days * 86400
        removed = 0
        with self._lock():
            for path in self.files():
                if finetune is not None and path.stem == finetune:
                    removed += sum(1 for line in path.read_bytes().splitlines() if line.strip())
                    path.unlink()
                    continue
                kept, gone = [], 0
                for line in path.read_bytes().splitlines():
                    try:
                        mark = json.loads(line)
                    except ValueError:
                        kept.append(line)  # a torn line is not ours to judge; it is skipped on read
                        continue
                    old = cutoff is not None and datetime.fromisoformat(mark["time"]).timestamp() < cutoff
                    if mark.get("id") in wanted or old:
                        gone += 1
                    else:
                        kept.append(line)
                if gone:
                    write_bytes_atomic(path, b"".join(line + b"\n" for line in kept))
                    removed += gone
        return removed


@contextmanager
def paused_gc() -> Iterator[None]:
    """Parsed JSON holds no reference cycles, yet every few hundred new containers the cyclic collector walks
    all of them: at 100k marks that tripled the read time. Paused while marks are read and folded, then left
    as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def fold(marks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per marked turn, in the order first marked: its context, the latest rating and the latest
    correction (a turn rated bad and then corrected has both), the time of its latest mark, and the ids of
    all its marks. The first mark of each turn becomes its row (no copy: at 100k marks copying doubled the
    time), so pass marks freshly read."""
    turns: dict[str, dict[str, Any]] = {}
    for mark in marks:
        row = turns.get(mark["turn"])
        if row is None:
            mark["ids"] = [mark.pop("id")]
            turns[mark["turn"]] = mark
            continue
        row["ids"].append(mark["id"])
        row["time"] = mark["time"]
        for key in ("rating", "correction"):
            if mark.get(key) is not None:
                row[key] = mark[key]
    return list(turns.values())
