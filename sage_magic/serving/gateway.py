"""The authenticating TCP gateway in front of a server's Unix socket, for when a person asks for a port.

vLLM checks its API key only on paths under /v1: ``POST /invocations`` answers a chat, ``/tokenize``
tokenizes and ``/metrics`` reports, all without a key. So our servers listen on a Unix socket in the 0700
runtime folder only, and a TCP port (``--finetune-port``) is this gateway, run by the server's supervisor:
it reads a request's head, checks ``Authorization: Bearer <key>`` (the scheme in any case, as RFC 9110 says)
for EVERY method and path before a byte reaches vLLM (401 otherwise), then pipes bytes both ways, so
streamed answers flow as they come. The request body is read from the client only as fast as vLLM takes it,
so a large upload to a busy server never piles up in the supervisor's memory.

One request per connection (``Connection: close`` is forced): a second, unchecked request can then never
ride on an authorised connection. Request bodies need a Content-Length (chunked uploads get 411; HTTP
clients send JSON with a length). A client that shuts its write side after its request still gets the
whole answer; a client that hangs up is noticed at the next bytes sent to it (vLLM streams tokens, so within
a token or two), which closes the upstream connection and makes vLLM abort the generation.

At most ``max_connections`` connections are served at once. Beyond that a new connection gets ``503`` with
``Retry-After`` at once, rather than waiting: a waiting connection would still hold a file descriptor of the
supervisor, and a client told to retry can do so, while one left waiting cannot tell a busy server from a
hung one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading

from ..core.config import DEFAULT_GATEWAY_CONNECTIONS

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0
#: How long a refused connection may take to read its 503 and close, before we close it anyway.
REFUSE_LINGER = 5.0
_CHUNK = 64 * 1024
# Connection-level headers are the gateway's business, not the client's: it decides the connection closes.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade"}


class Gateway:
    """Serve ``listener`` (a bound, listening TCP socket) in a thread, forwarding authorised requests to
    the Unix socket ``upstream``."""

    def __init__(self, listener: socket.socket, upstream: str, api_key: str,
                 max_connections: int = DEFAULT_GATEWAY_CONNECTIONS) -> None:
        self._listener = listener
        self._upstream = upstream
        self._key = api_key.encode()
        self._max_connections = max_connections
        self._active = 0  # only touched on the gateway's event loop: no lock needed
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="sage-gateway", daemon=True)
        self._ready = threading.Event()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def start(self) -> "Gateway":
        self._thread.start()
        self._ready.wait(10)
        return self

    def close(self) -> None:
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(5)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self._listener, limit=MAX_HEAD)
        self._ready.set()
        async with server:
            await self._stopped.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        busy = self._active >= self._max_connections
        self._active += not busy
        try:
            if busy:
                await _refuse_busy(reader, writer, self._max_connections)
            else:
                await self._forward(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        finally:
            self._active -= not busy
            writer.close()

    def _authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """``Authorization: Bearer KEY``, the scheme in any case; the key compared in constant time."""
        for name, value in headers:
            scheme, _, key = value.partition(b" ")
            if name == b"authorization" and scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self._key):
                return True
        return False

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            return await _reply(writer, 431, "The request head is too large.")
        request_line, headers = _parse_head(head)
        if request_line is None:
            return await _reply(writer, 400, "Malformed HTTP request.")
        if not self._authorised(headers):
            return await _reply(writer, 401, "This server needs its API key: Authorization: Bearer KEY. The key "
                                             "is in the server's registry record, readable by its owner only.")
        if any(name == b"transfer-encoding" for name, _ in headers):
            return await _reply(writer, 411, "Send the request body with a Content-Length.")
        lengths = [value for name, value in headers if name == b"content-length"]
        if len(set(lengths)) > 1 or (lengths and not lengths[0].strip().isdigit()):
            return await _reply(writer, 400, "Bad Content-Length.")
        length = int(lengths[0]) if lengths else 0
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self._upstream)
        except OSError:
            return await _reply(writer, 503, "The model server is not ready yet; retry shortly.")
        try:
            kept = [name + b": " + value for name, value in headers if name not in _HOP_BY_HOP]
            up_writer.write(b"\r\n".join([request_line, *kept, b"Connection: close", b"", b""]))
            while length > 0:
                data = await reader.read(min(length, _CHUNK))
                if not data:
                    return
                up_writer.write(data)
                await up_writer.drain()  # backpressure: read no more from the client than vLLM has taken
                length -= len(data)
            await up_writer.drain()
            await _pipe_response(up_reader, writer, reader)
        finally:
            up_writer.close()


async def _pipe_response(up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         client: asyncio.StreamReader) -> None:
    """Copy the response to the client as it arrives, until it ends or the client is gone.

    The client's end of file is not its departure: a client may shut its write side once the request is
    sent and still read the answer. So EOF only ends the watching; a client that really hung up is found
    when a write to it fails (its reset ends ``copy``). A reset seen while reading ends both at once."""

    async def copy() -> None:
        while data := await up_reader.read(_CHUNK):
            if writer.is_closing():
                return
            writer.write(data)
            await writer.drain()

    async def discard_until_eof() -> None:
        while await client.read(_CHUNK):
            pass  # nothing more may come after the one request; discard it

    copying = asyncio.ensure_future(copy())
    watching = asyncio.ensure_future(discard_until_eof())
    await asyncio.wait({copying, watching}, return_when=asyncio.FIRST_COMPLETED)
    if watching.done() and watching.exception() is None:
        await asyncio.wait({copying})  # half-closed: the answer still goes out whole
    for task in (copying, watching):
        task.cancel()
    await asyncio.gather(copying, watching, return_exceptions=True)


async def _refuse_busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int) -> None:
    """Answer 503 without reading the request, then read and drop what the client sends until it closes:
    closing a socket with unread bytes would send a reset, which can destroy the 503 before it is read."""
    await _reply(writer, 503, f"The model server is busy: {limit} connections are open, the gateway's limit "
                              "(SAGE_GATEWAY_CONNECTIONS). Retry shortly.")
    if writer.can_write_eof():
        writer.write_eof()

    async def drop() -> None:
        while await reader.read(_CHUNK):
            pass

    await asyncio.wait_for(drop(), REFUSE_LINGER)


def _parse_head(head: bytes) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
    """The request line and the headers (names lower-cased); (None, []) when it is not HTTP/1.x."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None, []
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None, []
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


async def _reply(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    reasons = {400: "Bad Request", 401: "Unauthorized", 411: "Length Required", 431: "Request Header Fields Too Large",
               503: "Service Unavailable"}
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    extra = {401: b"WWW-Authenticate: Bearer\r\n", 503: b"Retry-After: 1\r\n"}.get(status, b"")
    writer.write(f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode() + extra + b"\r\n" + body)
    await writer.drain()
