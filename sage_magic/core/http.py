"""Small JSON-over-HTTP calls: to our own servers (loopback or Unix socket) and to remote endpoints.

Proxies are for the outside world: a corporate HTTP(S)_PROXY must never see a loopback health check, a
socket request or an API key, but a remote ``--backend openai`` endpoint behind that proxy must still be
reached through it. Standard library only, so that status checks stay cheap.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket as _socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

from .endpoint import LOOPBACK_HOSTS


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


@dataclass
class Route:
    """Where one request goes: an unopened connection, the request target to send on it (an absolute URL when
    a plain-HTTP proxy relays it) and headers the route needs (Host, proxy credentials)."""

    connection: http.client.HTTPConnection
    target: str
    headers: dict[str, str] = field(default_factory=dict)


def route(url: str, timeout: float, socket: str | None = None) -> Route:
    """The connection for ``url``: the Unix socket when given, direct for loopback hosts, and through the
    environment's proxy (read now, not at import: a kernel may gain one later) for anything else, as
    urllib would. The caller owns the connection and holds its socket, so it can shut it from another thread."""
    parsed = urlparse(url)
    path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    if socket is not None:
        return Route(_UnixConnection(socket, timeout), path)
    host, https = parsed.hostname or "", parsed.scheme == "https"
    port = parsed.port or (443 if https else 80)
    proxy = None if host in LOOPBACK_HOSTS else _proxy_for(parsed.scheme, host)
    if proxy is None:
        return Route(_connection(https, host, port, timeout), path)
    via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    headers = {}
    if via.username:
        login = f"{unquote(via.username)}:{unquote(via.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(login).decode()
    connection = _connection(https, via.hostname or "", via.port or 80, timeout)
    if https:  # CONNECT through the proxy, then TLS with the endpoint itself
        connection.set_tunnel(host, port, headers)
        return Route(connection, path)
    return Route(connection, url, {**headers, "Host": parsed.netloc})


def _connection(https: bool, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    if not https:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    import ssl  # only remote endpoints speak TLS: loopback and socket requests never pay for a context

    return http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())


def _proxy_for(scheme: str, host: str) -> str | None:
    import urllib.request

    if urllib.request.proxy_bypass(host):  # NO_PROXY
        return None
    return urllib.request.getproxies().get(scheme)


def error_text(error: BaseException) -> str:
    """An exception's message, or its name when it has none (http.client's IncompleteRead, RemoteDisconnected)."""
    return str(error) or type(error).__name__


def request_text(url: str, api_key: str | None = None, payload: Any = None, timeout: float = 5.0,
                 socket: str | None = None) -> str:
    """GET (or POST when ``payload`` is given) and return the body; raise HttpError on failure."""
    way = route(url, timeout, socket)
    headers = {"Accept": "application/json", **way.headers}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    try:
        way.connection.request("POST" if data is not None else "GET", way.target, body=data, headers=headers)
        response = way.connection.getresponse()
        body = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        raise HttpError(None, error_text(error)) from None
    finally:
        way.connection.close()
    if response.status >= 400:
        raise HttpError(response.status, body)
    return body


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
