"""One query on one thread, without leaving the process's thread settings changed behind it.

A single query is faster on one thread than fanned out over torch's or FAISS's OpenMP threads (measured on 2
loaded cores: 47 ms against 1 s for the embedding, 3x for the search). But the thread count is process-wide
state: torch keeps the last value set by any thread and gives it to every thread that starts using torch
later. Two searches that each save, lower and restore it concurrently interleave (A saves 2 and sets 1, B
saves 1, A restores 2, B restores 1), and the process is left on one thread for everything after, indexing
included. So every change goes through :func:`one_thread`, which makes save, lower, run and restore one
step that no other search can interleave with. The lock is reentrant, so a search can hold it across its
embedding and its FAISS lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()


@contextmanager
def one_thread(get: Callable[[], int], set_: Callable[[int], None]) -> Iterator[None]:
    """Run the body with the thread count behind ``get``/``set_`` at 1, serialized with every other such body."""
    with _LOCK:
        before = get()
        set_(1)
        try:
            yield
        finally:
            set_(before)
