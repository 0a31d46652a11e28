"""The engine's few file primitives, in one place: atomic JSON writes, exclusive locks, timestamps.

Registry records, index manifests and merge markers are all read by other processes while they may be
rewritten; each goes through :func:`write_json_atomic` (write beside, fsync, rename), so a reader sees the
old or the new content whole, and a crash leaves no half-written file. The fsync is what survives a power
loss; records that only describe running processes skip it (``durable=False``), since none of those
processes outlives the machine, and are swapped in rather than renamed over (see :func:`_swap_in`). Every
cross-process lock is an ``flock`` on a lock file (:func:`exclusive`): the kernel releases it when its holder
dies, so a killed writer never blocks the next one.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator


class LockBusy(Exception):
    """``exclusive(..., wait=False)`` found the lock held by another process."""


def write_json_atomic(path: Path, data: Any, mode: int = 0o600, durable: bool = True, compact: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically, created with ``mode``; ``durable`` also fsyncs it
    (a crash of this process never leaves half a file either way: the rename is what readers see).
    ``compact`` writes one line: json indents only with its pure-Python encoder, ~30x slower than the C one,
    which files rewritten on a hot path (registry records, several KiB with many adapters) cannot afford."""
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1)
    write_bytes_atomic(path, text.encode(), mode, durable)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data``, atomically (write beside, rename), created with ``mode``: a reader sees
    the old content or the new, whole; a crash leaves no half-written file. ``durable`` fsyncs before the
    rename, so the new content also survives a power cut."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if durable or not _swap_in(tmp, path):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _swap_in(new: Path, path: Path) -> bool:
    """Exchange ``new`` and ``path`` atomically, then remove the old content (now under ``new``'s name);
    False where that cannot be done (no such call, or no ``path`` yet), and nothing changed.

    Why not a rename: ext4 flushes a file's unwritten data when a rename replaces another file (its
    ``auto_da_alloc`` guard for programs that skip fsync), and on a busy disk that flush took 2-4 ms, which
    made each warm reuse of a server (two registry writes) cost 4-8 ms. An exchange (Linux's renameat2 with
    RENAME_EXCHANGE) is not subject to it, and readers still see the old file or the new one, whole."""
    exchange = _renameat2()
    if exchange is None or exchange(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(path),
                                    _RENAME_EXCHANGE) != 0:
        return False
    new.unlink(missing_ok=True)
    return True


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, or None (not Linux, or a libc older than glibc 2.28)."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


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
