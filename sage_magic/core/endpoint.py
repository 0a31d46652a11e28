"""Where a chat request goes: an OpenAI-compatible base URL, its key, the model name, and (for servers we
start) the Unix socket that carries the traffic.

Its own small module so that talking to a remote ``--backend openai`` endpoint needs nothing of the serving
machinery. The API key never shows in ``repr()``: a notebook cell that ends with an endpoint would otherwise
save the key into the .ipynb, and test logs would print it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@dataclass(frozen=True)
class Endpoint:
    """``base_url`` ends in ``/v1``. With ``socket`` set, requests travel over that Unix domain socket and the
    URL's host is only nominal. ``server_id`` is None for an endpoint sage_magic did not start; there the
    registry cannot say which weights answer, so ``fingerprint`` carries the digest of the fine-tune
    sage_magic published or loaded onto it (marks made on its answers train on what really answered)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str = ""
    server_id: str | None = None
    reused: bool = False
    socket: str | None = None
    fingerprint: str | None = None

    @property
    def root_url(self) -> str:
        """The server's root (``/health``, ``/tokenize`` live there, outside ``/v1``)."""
        return self.base_url.rsplit("/v1", 1)[0]

    @property
    def is_local(self) -> bool:
        """True for a socket or a loopback address: proxies must never see such traffic."""
        return self.socket is not None or (urlparse(self.base_url).hostname or "") in LOOPBACK_HOSTS

    def for_model(self, model: str) -> "Endpoint":
        """The same server, asked for another model it serves (a sibling adapter, or the base)."""
        return replace(self, model=model, fingerprint=None)
