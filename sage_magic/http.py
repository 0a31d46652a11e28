"""Small JSON-over-HTTP calls: to our own servers (loopback or Unix socket) and to remote endpoints.

Proxies are for the outside world: a corporate HTTP(S)_PROXY must never see a loopback health check, a
socket request or an API key, but a remote ``--backend openai`` endpoint behind that proxy must still be
reached through it. Standard library only, so that status checks stay cheap.
"""

from __future__ import annotations

import http.client
import json
import socket as _socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

from .endpoint import LOOPBACK_HOSTS

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpError(Exception):
    def __init__(self, status: int | None, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection whose transport is a Unix domain socket (vLLM's ``--uds``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _over_socket(path: str, method: str, url: str, data: bytes | None, headers: dict[str, str],
                 timeout: float) -> str:
    parsed = urlparse(url)
    target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, target, body=data, headers=headers)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        raise HttpError(None, str(error)) from None
    finally:
        conn.close()
    if response.status >= 400:
        raise HttpError(response.status, body)
    return body


def request_text(url: str, api_key: str | None = None, payload: Any = None, timeout: float = 5.0,
                 socket: str | None = None) -> str:
    """GET (or POST when ``payload`` is given) and return the body; raise HttpError on failure."""
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    method = "POST" if data is not None else "GET"
    if socket is not None:
        return _over_socket(socket, method, url, data, headers, timeout)
    # built per call for remote URLs: a ProxyHandler reads HTTP(S)_PROXY when it is made, and a kernel's
    # environment may gain a proxy after this module was imported
    opener = _DIRECT if (urlparse(url).hostname or "") in LOOPBACK_HOSTS else urllib.request.build_opener()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with opener.open(req, timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        raise HttpError(error.code, error.read().decode("utf-8", "replace")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise HttpError(None, str(getattr(error, "reason", error))) from None


def request_json(url: str, api_key: str | None = None, payload: Any = None, timeout: float = 5.0,
                 socket: str | None = None) -> Any:
    """Like :func:`request_text`, decoded as JSON. A body that is not JSON is an HttpError (a server that
    answers 200 with HTML is not the server we think it is)."""
    body = request_text(url, api_key, payload, timeout, socket)
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise HttpError(200, f"not JSON: {body[:200]}") from None


def healthy(root_url: str, timeout: float = 2.0, socket: str | None = None) -> bool:
    """vLLM answers /health with 200 only once the engine is ready (and 503 if it died)."""
    try:
        request_text(f"{root_url}/health", timeout=timeout, socket=socket)
        return True
    except HttpError:
        return False
