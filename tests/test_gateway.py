"""The TCP gateway in front of a server's Unix socket: mostly against a fake upstream, and the session's real
vLLM server where it can show the fault (the scheme's case, a client that half-closes).

A fake upstream, because what is checked there is what reaches the server, byte for byte: that a request
without the key never opens a connection to it, that a second request riding on an authorised connection is
never forwarded, that a streamed answer passes through before it ends, that a client hanging up closes
the upstream connection, that an upload reaches the server only as fast as it reads, and that a connection
beyond the limit gets 503 while the held ones finish. A real vLLM can be made to show none of that (it
cannot be told to stop reading or to hold an answer). tests/test_security.py asks a real server.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from sage_magic.core.config import DEFAULT_GATEWAY_CONNECTIONS, Settings
from sage_magic.core.errors import SageError
from sage_magic.finetune.demo import DEMO_PROMPT
from sage_magic.serving.gateway import Gateway
from tests.conftest import wait_until

KEY = "k3y-for-tests"


class Upstream:
    """A Unix-socket server that records each connection's bytes and answers with a scripted response.

    After answering, it reads on until the gateway closes the connection, so a connection's record is
    everything the gateway ever sent on it (see :meth:`recorded`), however late it came."""

    def __init__(self, path: Path, answer) -> None:
        self.path = str(path)
        self.answer = answer
        self.connections: list[bytes] = []
        self._done: list[threading.Event] = []
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
            self._done.append(threading.Event())
            self.connections.append(b"")
            threading.Thread(target=self._one, args=(conn, len(self.connections) - 1), daemon=True).start()

    def _one(self, conn: socket.socket, index: int) -> None:
        data = bytearray()
        with conn:
            try:
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                self.connections[index] = bytes(data)
                self.answer(conn)
                conn.settimeout(30)
                while chunk := conn.recv(1 << 20):  # until the gateway closes its end
                    data += chunk
                self.closed.set()
            except TimeoutError:
                pass
            except OSError:  # the gateway reset the connection: closed too
                self.closed.set()
            finally:
                self.connections[index] = bytes(data)
                self._done[index].set()

    def recorded(self, count: int = 1) -> list[bytes]:
        """The bytes of the first ``count`` connections, once the gateway has closed each of them."""
        assert wait_until(lambda: len(self._done) >= count, 10)
        assert all(done.wait(30) for done in self._done[:count])
        return self.connections

    def close(self) -> None:
        self._sock.close()


def _ok(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def gateway_for(tmp_path: Path):
    made: list[tuple[Gateway, Upstream]] = []

    def make(answer=_ok, max_connections: int = DEFAULT_GATEWAY_CONNECTIONS,
             receive_buffer: int | None = None) -> tuple[Gateway, Upstream]:
        upstream = Upstream(tmp_path / f"up{len(made)}.sock", answer)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:  # accepted sockets inherit it, and a fixed size turns off the kernel's autotuning
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        gateway = Gateway(listener, upstream.path, KEY, max_connections).start()
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
                                  b"X-Authorization: Bearer k3y-for-tests\r\n",
                                  b"Authorization: Basic k3y-for-tests\r\n",
                                  b"Authorization: Bearer K3Y-FOR-TESTS\r\n"])
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
    (forwarded,) = upstream.recorded()  # all the gateway sent, up to its closing of the connection
    assert b"/invocations" not in forwarded
    assert forwarded.count(b"HTTP/1.1\r\n") == 1 and b"Connection: close\r\n" in forwarded
    assert b"keep-alive" not in forwarded.lower()


def test_a_request_body_is_forwarded_whole(gateway_for) -> None:
    gateway, upstream = gateway_for()
    body = b"x" * 200_000
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y-for-tests\r\n"
    answer = _read_all(_send(gateway.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body))
    assert answer.endswith(b"ok")
    assert upstream.recorded()[0].endswith(b"\r\n\r\n" + body)


def test_a_streamed_answer_passes_through_before_it_ends_and_a_hang_up_closes_upstream(gateway_for) -> None:
    release = threading.Event()

    def stream(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                     b"data: first\n\n")
        release.wait(10)
        for _ in range(1000):  # tokens keep coming, as from vLLM, until the gateway closes the connection
            conn.sendall(b"data: more\n\n")
            time.sleep(0.01)

    gateway, upstream = gateway_for(stream)
    conn = _send(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer k3y-for-tests\r\nContent-Length: 2\r\n\r\n{}")
    received = b""
    while b"data: first" not in received:
        received += conn.recv(65536)
    assert b"more" not in received  # it arrived while the upstream still held the rest
    conn.close()  # the user pressed Stop
    release.set()
    assert upstream.closed.wait(5)


GOOD = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y-for-tests\r\n\r\n"


@pytest.mark.parametrize("auth", [b"authorization: bearer k3y-for-tests", b"Authorization: BEARER k3y-for-tests",
                                  b"AUTHORIZATION:   Bearer   k3y-for-tests"])
def test_the_auth_scheme_is_case_insensitive(gateway_for, auth: bytes) -> None:
    """RFC 9110: the scheme name is case-insensitive (the key itself is not: see the 401 test above)."""
    gateway, upstream = gateway_for()
    answer = _read_all(_send(gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    assert len(upstream.recorded()) == 1


def test_a_client_that_half_closes_still_gets_the_whole_answer(gateway_for) -> None:
    """Its EOF is no hang-up. The fake answers only once the client has shut its side, and at length (1 MB)."""
    shut = threading.Event()
    body = b"y" * 1_000_000

    def answer(conn: socket.socket) -> None:
        shut.wait(10)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        conn.shutdown(socket.SHUT_WR)

    gateway, upstream = gateway_for(answer)
    conn = _send(gateway.port, GOOD)
    conn.shutdown(socket.SHUT_WR)
    shut.set()
    assert _read_all(conn).endswith(b"\r\n\r\n" + body)


def test_an_upload_is_read_only_as_fast_as_the_server_takes_it(gateway_for) -> None:
    """While the server reads nothing, the client is held back after a few socket buffers' worth, instead
    of the whole body piling up in the gateway's memory; once the server reads, the body arrives whole."""
    release = threading.Event()

    def answer(conn: socket.socket) -> None:
        release.wait(60)
        _ok(conn)

    gateway, upstream = gateway_for(answer, receive_buffer=256 * 1024)
    size = 32 << 20
    body = memoryview(b"z" * size)
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    conn.connect(("127.0.0.1", gateway.port))
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y-for-tests\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    conn.setblocking(False)
    sent = 0
    while sent < size:
        try:
            sent += conn.send(body[sent:sent + (1 << 20)])
        except BlockingIOError:
            if not select.select([], [conn], [], 5)[1]:
                break  # held back: the gateway reads no more until the server does
    assert sent < size // 4, f"the gateway took {sent} bytes of the body while the server read none"
    release.set()
    conn.setblocking(True)
    conn.settimeout(60)
    conn.sendall(body[sent:])
    assert _read_all(conn).endswith(b"ok")
    assert upstream.recorded()[0].endswith(b"\r\n\r\n" + body)


def test_connections_beyond_the_limit_get_503_and_the_held_ones_finish(gateway_for) -> None:
    release = threading.Event()

    def held(conn: socket.socket) -> None:
        release.wait(30)
        _ok(conn)

    gateway, upstream = gateway_for(held, max_connections=2)
    first, second = _send(gateway.port, GOOD), _send(gateway.port, GOOD)
    assert wait_until(lambda: len(upstream.connections) == 2, 10)
    refused = _read_all(_send(gateway.port, GOOD))
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in refused and b"busy" in refused
    assert len(upstream.connections) == 2  # the refused request never reached the server
    release.set()
    assert _read_all(first).endswith(b"ok") and _read_all(second).endswith(b"ok")
    assert _read_all(_send(gateway.port, GOOD)).endswith(b"ok")  # their slots are free again


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5"])
def test_a_bad_connection_limit_is_one_clear_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(SageError, match="SAGE_GATEWAY_CONNECTIONS must be a whole number of at least 1"):
        Settings.from_env(environ={"SAGE_GATEWAY_CONNECTIONS": value}, home=tmp_path, runtime_dir=tmp_path / "run")
    limit = Settings.from_env(environ={"SAGE_GATEWAY_CONNECTIONS": "8"}, home=tmp_path, runtime_dir=tmp_path / "run")
    assert limit.gateway_connections == 8


def _chat(authorization: bytes) -> bytes:
    body = json.dumps({"model": "demo_expert", "messages": [{"role": "user", "content": DEMO_PROMPT}],
                       "max_tokens": 8}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: " + authorization + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.vllm
@pytest.mark.parametrize("scheme, half_close", [(b"bearer", False), (b"BEARER", False), (b"Bearer", True)])
def test_the_real_server_answers_any_case_of_bearer_and_a_half_closed_client(manager, expert, scheme: bytes,
                                                                           half_close: bool) -> None:
    """RFC 9110: the auth scheme is case-insensitive. And a client may shut its write side once the request is
    sent (`curl` with some options, scripts): its EOF is no hang-up, it must get the whole answer."""
    port = manager.registry.get(expert.server_id).port
    conn = socket.create_connection(("127.0.0.1", port), timeout=120)
    conn.sendall(_chat(scheme + b" " + expert.api_key.encode()))
    if half_close:
        conn.shutdown(socket.SHUT_WR)
    head, _, body = _read_all(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["choices"][0]["message"]["content"].strip()
