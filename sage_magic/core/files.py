"""The engine's few file primitives, in one place: atomic JSON writes, exclusive locks, timestamps.

Registry records, index manifests and merge markers are all read by other processes while they may be
rewritten; each goes through :func:`write_json_atomic` (write beside, fsync, rename), so a reader sees the
old or the new content whole, and a crash leaves no half-written file. Every cross-process lock is an
``flock`` on a lock file (:func:`exclusive`): the kernel releases it when its holder dies, so a killed writer
never blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator


class LockBusy(Exception):
    """``exclusive(..., wait=False)`` found the lock held by another process."""


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically and durably, created with ``mode``."""
    write_bytes_atomic(path, json.dumps(data, indent=1).encode(), mode)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``, atomically and durably (write beside, fsync, rename), created with
    ``mode``: a reader sees the old content or the new, whole; a crash leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def exclusive(path: Path, wait: bool = True, poll: float = 0.1,
              should_stop: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600). Locks are per open file, so this also excludes
    other threads of this process. ``wait=False`` raises :class:`LockBusy` at once instead of waiting;
    ``should_stop`` is polled while waiting, so a cancelled caller does not sit behind someone else's lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if wait and should_stop is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait or (should_stop is not None and should_stop()):
                        raise LockBusy(str(path)) from None
                    time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def utc_now() -> str:
    """A timestamp for manifests and stamps people read: ISO 8601, UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def subfolders(root: Path, marker: str | None = None) -> list[str]:
    """Sorted names of the visible folders under ``root`` (holding ``marker`` when given); [] if no root."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (marker is None or (p / marker).is_file()))
