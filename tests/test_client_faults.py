"""Faults a real vLLM server cannot be made to show on demand, played by a fake server on loopback:
a connection cut in the middle of a streamed answer, and a server that accepts and never answers."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from sage_magic.client import ChatClient
from sage_magic.errors import ServerFailed
from sage_magic.manager import Endpoint


def _chunk(text: str) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(body)}\n\n".encode()


def _serve_once(handler) -> tuple[int, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run() -> None:
        conn, _ = listener.accept()
        try:
            conn.recv(65536)
            handler(conn)
        finally:
            conn.close()
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_a_crash_mid_stream_is_a_clear_error_that_keeps_the_partial_text() -> None:
    def crash(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.sendall(head)
        for piece in ("Hello", " wor"):
            data = _chunk(piece)
            conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        conn.shutdown(socket.SHUT_RDWR)  # the server dies: no final chunk, no [DONE]

    port, thread = _serve_once(crash)
    client = ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m"))
    seen: list[str] = []
    with pytest.raises(ServerFailed) as error:
        client.stream([{"role": "user", "content": "hi"}], on_delta=seen.append)
    assert "".join(seen) == "Hello wor"
    assert "Hello wor" in str(error.value) and "broke off" in str(error.value)
    thread.join(5)


def test_a_hung_server_times_out_with_a_clear_error() -> None:
    release = threading.Event()
    port, thread = _serve_once(lambda conn: release.wait(10))
    client = ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m"), timeout=1.0)
    with pytest.raises(ServerFailed) as error:
        client.stream([{"role": "user", "content": "hi"}])
    assert "did not answer within 1 s" in str(error.value)
    release.set()
    thread.join(5)
