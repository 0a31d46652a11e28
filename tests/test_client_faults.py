"""Faults a real vLLM server cannot be made to show on demand, played by fake servers on loopback: a
connection cut in the middle of a streamed answer, a server that accepts and never answers, one that sends
its headers and then holds the first token (a long prefill, frozen), and an HTTP proxy that records what
passes through it (no real proxy runs here)."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import threading

import pytest

from sage_magic.chat.client import ChatClient
from sage_magic.core.endpoint import Endpoint
from sage_magic.core.errors import ServerFailed

STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(text: str) -> bytes:
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(body)}\n\n".encode()


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


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


def _until_client_leaves(conn: socket.socket, left: threading.Event) -> None:
    """Hold the connection, sending nothing more, until the client closes it (recv sees EOF or a reset)."""
    conn.settimeout(30)
    try:
        while conn.recv(1024):
            pass
        left.set()
    except ConnectionResetError:
        left.set()
    except OSError:
        pass  # timed out: the client never left, and `left` stays unset


def _cancel_soon(cancel: threading.Event) -> threading.Thread:
    """A Stop button pressed in another thread while the caller's thread is blocked in the request."""
    thread = threading.Thread(target=lambda: (threading.Event().wait(0.3), cancel.set()), daemon=True)
    thread.start()
    return thread


def test_a_crash_mid_stream_is_a_clear_error_that_keeps_the_partial_text() -> None:
    def crash(conn: socket.socket) -> None:
        conn.sendall(STREAM_HEAD)
        for piece in ("Hello", " wor"):
            conn.sendall(_http_chunk(_chunk(piece)))
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


def test_cancel_from_another_thread_ends_a_wait_for_the_first_byte() -> None:
    """The server accepted and holds its first byte: the old client only looked at ``cancel`` when a chunk came,
    so it waited for its timeout (here 60 s, then an error) instead of stopping."""
    release = threading.Event()
    port, thread = _serve_once(lambda conn: release.wait(60))
    client = ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m"), timeout=60)
    cancel = threading.Event()
    _cancel_soon(cancel)
    result = client.stream([{"role": "user", "content": "hi"}], cancel=cancel)
    assert result.cancelled and result.text == "" and result.completion_tokens is None
    release.set()
    thread.join(5)


@pytest.mark.parametrize(("sent", "kept"), [
    (b"", ""),  # headers sent, first token not yet: what a long prompt's prefill looks like
    (_http_chunk(_chunk("Roses")) + _http_chunk(_chunk(" are")), "Roses are"),  # mid-stream, then a stall
], ids=["prefill", "mid-stream"])
def test_cancel_from_another_thread_keeps_the_text_and_hangs_up_so_the_server_aborts(sent: bytes, kept: str) -> None:
    """A cancel must end the call, keep what arrived and close the connection, which is how vLLM learns to
    abort the request."""
    left = threading.Event()

    def stall(conn: socket.socket) -> None:
        conn.sendall(STREAM_HEAD + sent)
        _until_client_leaves(conn, left)

    port, thread = _serve_once(stall)
    client = ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m"), timeout=60)
    cancel = threading.Event()
    _cancel_soon(cancel)
    result = client.stream([{"role": "user", "content": "hi"}], cancel=cancel)
    assert result.cancelled and result.text == kept
    thread.join(10)
    assert left.is_set(), "the server never saw the client hang up, so vLLM would go on generating"


def test_an_interrupt_while_the_request_starts_still_hangs_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGINT that lands while the caller starts the request's worker thread (a real signal ends the wait in
    Thread.start at once) used to leave that worker running: it sent the request, and nobody hung up, so vLLM
    generated the whole answer for nobody."""
    left = threading.Event()
    port, thread = _serve_once(lambda conn: (conn.sendall(STREAM_HEAD), _until_client_leaves(conn, left)))
    start = threading.Thread.start

    def start_then_interrupt(worker: threading.Thread) -> None:
        start(worker)
        if worker.name == "sage-chat-stream":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    client = ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m"), timeout=60)
    with pytest.raises(KeyboardInterrupt):
        client.stream([{"role": "user", "content": "hi"}])
    monkeypatch.undo()
    thread.join(30)
    assert left.is_set(), "the server never saw the client hang up, so vLLM would go on generating"


class _RecordingProxy(http.server.BaseHTTPRequestHandler):
    """Plays a corporate forward proxy with the remote model behind it: it records each request line (a proxy
    is asked for absolute URLs) and answers as an OpenAI-compatible server would."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(f"GET {self.path}")
        self._send("application/json", json.dumps({"data": [{"id": "m", "max_model_len": 2048}]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        self.seen.append(f"POST {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/tokenize"):
            self._send("application/json", json.dumps({"count": 7}).encode())
        else:
            self._send("text/event-stream", _chunk("Hi from afar") + b"data: [DONE]\n\n")

    def _send(self, kind: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch):
    """HTTP(S)_PROXY pointing at a recording proxy; NO_PROXY unset, as on a corporate desktop."""
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    _RecordingProxy.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, url)
    yield _RecordingProxy.seen
    server.shutdown()
    server.server_close()


def test_a_remote_endpoint_is_reached_through_the_environment_proxy(proxy_env: list[str]) -> None:
    """Behind a corporate proxy a remote --backend openai endpoint is only reachable through it: the chat, and
    the window and token counts that budget RAG context, must all go there (they silently failed before)."""
    client = ChatClient(Endpoint("http://models.example.invalid/v1", "k", "m"))
    assert client.max_model_len() == 2048
    assert client.count_tokens([{"role": "user", "content": "hi"}]) == 7
    assert client.stream([{"role": "user", "content": "hi"}]).text == "Hi from afar"
    assert proxy_env == ["GET http://models.example.invalid/v1/models",
                         "POST http://models.example.invalid/tokenize",
                         "POST http://models.example.invalid/v1/chat/completions"]


def test_cancel_from_another_thread_ends_a_hung_search(tmp_path) -> None:
    """Retrieval runs before the request (in a notebook, in a helper process that may hang): a cancel must end
    ``ask`` there too, keeping no half turn. The endpoint is a closed port, so only the search can hold it."""
    from sage_magic.chat.conversation import Conversation
    from sage_magic.core.config import Settings

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    release = threading.Event()

    def hung_search(index: str, query: str, top_k: int, mode: str) -> list:
        release.wait(60)
        return []

    chat = Conversation(ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m")),
                        Settings.from_env(environ={}, home=tmp_path), search=hung_search)
    cancel = threading.Event()
    _cancel_soon(cancel)
    answer = chat.ask("hi", index="notes", cancel=cancel)
    assert answer.cancelled and answer.text == "" and chat.history == []
    release.set()


def test_an_answer_that_arrives_in_one_burst_shows_no_rate_rather_than_a_wrong_one() -> None:
    """A buffering proxy (or a busy reader) hands over a whole short answer at once: a real local vLLM streams
    token by token, so only a stand-in shows it. The footer once read "49225.3 tok/s" for such an answer."""
    def burst(conn: socket.socket) -> None:
        usage = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
        events = [_chunk("One"), _chunk(" two"), _chunk(" three"), f"data: {json.dumps(usage)}\n\n".encode(),
                  b"data: [DONE]\n\n"]
        conn.sendall(STREAM_HEAD + b"".join(_http_chunk(e) for e in events) + b"0\r\n\r\n")

    port, thread = _serve_once(burst)
    result = ChatClient(Endpoint(f"http://127.0.0.1:{port}/v1", "k", "m")).stream([{"role": "user", "content": "hi"}])
    thread.join(5)
    assert result.text == "One two three" and result.completion_tokens == 3
    assert result.tokens_per_second is None
