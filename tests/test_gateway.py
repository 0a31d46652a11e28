"""The TCP gateway in front of a server's Unix socket, against a fake upstream.

A fake upstream, because what is checked here is what reaches the server, byte for byte: that a request
without the key never opens a connection to it, that a second request riding on an authorised connection is
never forwarded, that a streamed answer passes through before it ends, and that a client hanging up closes
the upstream connection. A real vLLM shows none of that. tests/test_security.py asks a real server.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from sage_magic.serving.gateway import Gateway

KEY = "k3y-for-tests"


class Upstream:
    """A Unix-socket server that records each connection's bytes and answers with a scripted response."""

    def __init__(self, path: Path, answer) -> None:
        self.path = str(path)
        self.answer = answer
        self.connections: list[bytes] = []
        self.closed = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections.append(b"")
            index = len(self.connections) - 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                time.sleep(0.2)  # let anything pipelined behind the request arrive too
                conn.settimeout(0.2)
                try:
                    while chunk := conn.recv(65536):
                        data += chunk
                except TimeoutError:
                    pass
                self.connections[index] = data
                self.answer(conn)
                conn.settimeout(2)
                try:
                    if conn.recv(1) == b"":
                        self.closed.set()
                except (TimeoutError, OSError):
                    pass

    def close(self) -> None:
        self._sock.close()


def _ok(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


@pytest.fixture
def gateway_for(tmp_path: Path):
    made: list[tuple[Gateway, Upstream]] = []

    def make(answer=_ok) -> tuple[Gateway, Upstream]:
        upstream = Upstream(tmp_path / "up.sock", answer)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        gateway = Gateway(listener, upstream.path, KEY).start()
        made.append((gateway, upstream))
        return gateway, upstream

    yield make
    for gateway, upstream in made:
        gateway.close()
        upstream.close()


def _send(port: int, data: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(data)
    return conn


def _read_all(conn: socket.socket) -> bytes:
    out = b""
    while chunk := conn.recv(65536):
        out += chunk
    conn.close()
    return out


@pytest.mark.parametrize("auth", [b"", b"Authorization: Bearer wrong\r\n", b"Authorization: k3y-for-tests\r\n",
                                  b"X-Authorization: Bearer k3y-for-tests\r\n"])
@pytest.mark.parametrize("target", [b"POST /invocations", b"POST /tokenize", b"GET /metrics", b"GET /health",
                                    b"GET /v1/models", b"GET /docs"])
def test_without_the_key_nothing_reaches_the_server(gateway_for, target: bytes, auth: bytes) -> None:
    gateway, upstream = gateway_for()
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    answer = _read_all(_send(gateway.port, target + b" HTTP/1.1\r\nHost: x\r\n" + auth +
                             b"Content-Length: %d\r\n\r\n" % len(body) + body))
    assert answer.startswith(b"HTTP/1.1 401 ") and b"API key" in answer
    assert upstream.connections == []


def test_one_checked_request_per_connection(gateway_for) -> None:
    gateway, upstream = gateway_for()
    first = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y-for-tests\r\n"
             b"Connection: keep-alive\r\n\r\n")
    smuggled = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    answer = _read_all(_send(gateway.port, first + smuggled))
    assert answer.endswith(b"\r\n\r\nok")
    (forwarded,) = upstream.connections
    assert b"/invocations" not in forwarded
    assert forwarded.count(b"HTTP/1.1\r\n") == 1 and b"Connection: close\r\n" in forwarded
    assert b"keep-alive" not in forwarded.lower()


def test_a_request_body_is_forwarded_whole(gateway_for) -> None:
    gateway, upstream = gateway_for()
    body = b"x" * 200_000
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y-for-tests\r\n"
    answer = _read_all(_send(gateway.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body))
    assert answer.endswith(b"ok")
    assert upstream.connections[0].endswith(b"\r\n\r\n" + body)


def test_a_streamed_answer_passes_through_before_it_ends_and_a_hang_up_closes_upstream(gateway_for) -> None:
    release = threading.Event()

    def stream(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                     b"data: first\n\n")
        release.wait(10)
        try:
            conn.sendall(b"data: second\n\n")
        except OSError:
            pass

    gateway, upstream = gateway_for(stream)
    conn = _send(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer k3y-for-tests\r\nContent-Length: 2\r\n\r\n{}")
    received = b""
    while b"data: first" not in received:
        received += conn.recv(65536)
    assert b"second" not in received  # it arrived while the upstream still held the rest
    conn.close()  # the user pressed Stop
    release.set()
    assert upstream.closed.wait(5)
