"""Leases: what the manager hands out. One lease is one use of one server, released exactly once.

A kernel may hold several leases on the same server (demo_expert and demo_poet share one base server; a
panel and a cell may both ask for demo_expert). Each lease is its own owner entry in the registry, so
releasing one, or failing to serve one, never drops the others. ``Lease.unmanaged`` wraps an endpoint
sage_magic did not start (``--backend openai``), so that faces handle every backend the same way.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..core.endpoint import Endpoint


class Lease:
    """An endpoint plus the duty to give it back. ``release()`` is idempotent and thread-safe; a lease is
    also a context manager. Until released, the server stays up for this lease (whatever its keep-alive).

    ``listing`` is the server's ``/v1/models`` answer (by id) when the manager asked for it while handing the
    lease out (it checks what a server serves before trusting it), else None: a client can learn the window
    from it instead of asking the same question again before the first token."""

    def __init__(self, endpoint: Endpoint, lease_id: str | None = None,
                 on_release: Callable[[str], None] | None = None, listing: dict[str, dict] | None = None) -> None:
        self.endpoint = endpoint
        self.listing = listing
        self.id = lease_id
        self._on_release = on_release
        self._lock = threading.Lock()
        self._released = on_release is None

    @classmethod
    def unmanaged(cls, endpoint: Endpoint) -> "Lease":
        """A lease on an endpoint nobody here started: releasing it does nothing."""
        return cls(endpoint)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Stop using the server through this lease; the server stops once no lease is left (after its
        keep-alive). Calling it again does nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        assert self._on_release is not None and self.id is not None
        self._on_release(self.id)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released and self._on_release else "held" if self._on_release else "unmanaged"
        return f"Lease({self.endpoint!r}, {state})"
