"""A thin streaming chat client for our servers and any OpenAI-compatible endpoint, on the standard library.

It speaks the chat-completions stream (server-sent events) itself over ``http.client``. The ``openai``
package's import alone costs over a second, and httpx ~50 ms to import plus ~45 ms to build the TLS context of
its first client (for a Unix socket too): both would land on the first question of every fresh kernel, whose
goal is the model's own time to first token plus 0.1 s.

It measures what a person asks about (time to first token, tokens per second, token usage) and can be
stopped at any moment from any thread, keeping whatever text already arrived: the blocking request runs on
a worker thread, so neither a long prefill nor a hung server holds the caller. Requests to loopback
addresses and Unix sockets ignore HTTP(S)_PROXY, which would otherwise swallow them; a remote endpoint is
reached through the proxy the environment names.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket as _socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..core.endpoint import Endpoint
from ..core.errors import SageError, ServerFailed
from ..core.http import HttpError, error_text, request_json, route

# How often a waiting caller looks at its cancel event: well inside the 0.5 s a Stop button may take.
POLL = 0.05
# The shortest stretch from first to last token that gives a decode rate: a short answer can reach the
# reader in one burst (a remote server's buffering, a busy kernel), and a rate over a few microseconds read
# "49225.3 tok/s". Shorter answers show no rate rather than a wrong one.
MIN_RATE_WINDOW = 0.05


@dataclass
class StreamResult:
    """The outcome of one streamed completion; ``text`` is partial when ``cancelled``."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    time_to_first_token: float | None
    tokens_per_second: float | None
    elapsed: float
    cancelled: bool


class ChatClient:
    """One endpoint's chat completions, its context window and its tokenizer. Safe to share between threads."""

    def __init__(self, endpoint: Endpoint, timeout: float = 600.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._window: int | None = None

    def close(self) -> None:
        """Nothing stays open between calls: each stream has its own connection, closed when it ends."""

    def max_model_len(self) -> int | None:
        """The served model's context length, from /v1/models (None if the server does not say). Asked once:
        a model's window does not change while it is served."""
        if self._window is None:
            try:
                models = request_json(f"{self.endpoint.base_url}/models", self.endpoint.api_key,
                                      socket=self.endpoint.socket)
            except HttpError:
                return None
            entries = models.get("data") if isinstance(models, dict) else None
            self.learn_window({m.get("id"): m for m in entries or [] if isinstance(m, dict)})
        return self._window

    @property
    def known_window(self) -> int | None:
        """The window if it is already known (asking for it is :meth:`max_model_len`)."""
        return self._window

    def learn_window(self, by_id: dict) -> None:
        """Take the window from a ``/v1/models`` listing (by model id) already at hand: a lease's, read when
        the manager confirmed the server, saves a fresh kernel's first question one request."""
        model = by_id.get(self.endpoint.model, {})
        # a LoRA adapter's entry carries no length of its own: it has its base's window
        self._window = model.get("max_model_len") or by_id.get(model.get("parent"), {}).get("max_model_len")

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """Prompt tokens for these messages through the served chat template (vLLM's /tokenize)."""
        try:
            answer = request_json(f"{self.endpoint.root_url}/tokenize", self.endpoint.api_key,
                                  {"model": self.endpoint.model, "messages": messages}, socket=self.endpoint.socket)
        except HttpError:
            return None
        return answer.get("count") if isinstance(answer, dict) else None

    def stream(self, messages: list[dict[str, str]], *, on_delta: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None, **params: Any) -> StreamResult:
        """Stream one chat completion; ``on_delta`` runs on the calling thread.

        The blocking request runs on a worker thread and this thread waits on its queue, so ``cancel`` set from
        any thread ends the call within :data:`POLL` seconds in every phase (before the first byte, during
        prefill, on a hung server, while streaming) and the connection is shut, which makes vLLM abort the
        request. A KeyboardInterrupt does the same and then propagates as :class:`StreamInterrupted`, which
        carries the text so far.
        """
        started = time.monotonic()
        call = _Call()
        events: queue.Queue = queue.Queue()
        parts: list[str] = []
        first: float | None = None
        finish = usage = None
        cancelled = ended = False
        try:  # from the worker's start on: an interrupt while it starts must still hang up
            threading.Thread(target=self._pump, args=(messages, params, call, events), daemon=True,
                             name="sage-chat-stream").start()
            while True:
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                try:
                    kind, value = events.get(timeout=POLL)
                except queue.Empty:
                    continue
                if kind == "end":
                    ended = True
                    break
                if kind == "failed":
                    raise self._failure(value, started_streaming=False, partial="")
                if kind == "broke":
                    raise self._failure(value, started_streaming=True, partial="".join(parts))
                usage = value.get("usage") or usage
                for choice in value.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        first = first or time.monotonic()
                        parts.append(content)
                        if on_delta is not None:
                            on_delta(content)
        except KeyboardInterrupt:
            raise StreamInterrupted(_result(parts, finish, usage, started, first, True)) from None
        finally:
            if not ended:  # vLLM sees the disconnect and aborts the request
                call.abort()
        return _result(parts, finish, usage, started, first, cancelled)

    def _pump(self, messages: list[dict[str, str]], params: dict[str, Any], call: _Call,
              events: queue.Queue) -> None:
        """The worker: make the request and queue each decoded chunk, until the end, a failure or an abort."""
        payload = {"model": self.endpoint.model, "messages": messages, "stream": True,
                   "stream_options": {"include_usage": True}, **params}
        way = route(f"{self.endpoint.base_url}/chat/completions", self.timeout, self.endpoint.socket)
        connection = way.connection
        try:
            try:
                connection.connect()
                if not call.attach(connection.sock):
                    return
                connection.request("POST", way.target, body=json.dumps(payload).encode(), headers={
                    **way.headers, "Authorization": f"Bearer {self.endpoint.api_key or 'EMPTY'}",
                    "Accept": "text/event-stream", "Content-Type": "application/json"})
                response = connection.getresponse()
            except Exception as error:  # noqa: BLE001 - handed to the caller's thread, which explains it
                if not call.aborted:
                    events.put(("failed", error))
                return
            if response.status >= 400:
                events.put(("failed", _Refused(response.status, response.read().decode("utf-8", "replace"))))
                return
            _read_events(response, call, events)
        finally:
            connection.close()

    def _failure(self, error: Exception, *, started_streaming: bool, partial: str) -> Exception:
        """One paragraph for what went wrong, with the next step."""
        where = self.endpoint.base_url
        network = (OSError, http.client.HTTPException)
        if started_streaming and isinstance(error, (*network, _Refused, ValueError)):
            return ServerFailed(f"The model at {where} broke off its answer ({error_text(error)}); the partial answer "
                                f"was: {partial!r}. `sage logs` shows why.")
        if isinstance(error, TimeoutError):
            return ServerFailed(f"The model at {where} did not answer within {self.timeout:g} s. `sage logs` shows "
                                "what the server is doing; a busy CPU server may need a longer timeout.")
        if isinstance(error, network):
            return ServerFailed(f"Cannot reach the model at {where} ({error_text(error)}). `sage ps` shows running "
                                "servers; start one again or check --base-url.")
        if isinstance(error, _Refused):
            return SageError(_status_message(self.endpoint, error))
        return error  # not a fault of the server or the network: a bug, shown as one


def _read_events(response: http.client.HTTPResponse, call: _Call, events: queue.Queue) -> None:
    """Queue each server-sent event's chunk until ``[DONE]``; a stream that breaks is queued as "broke".

    http.client reads a chunked body that stops short (the server died) as a quiet end of file, so an end
    with neither ``[DONE]`` nor a finish reason counts as broken."""
    finished = False
    try:
        for raw in response:
            if call.aborted:
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data:"):
                continue  # blank separators, comments, other SSE fields
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if isinstance(chunk, dict):
                if "error" in chunk:  # the server failed after the stream began
                    raise _Refused(500, data)
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
            events.put(("chunk", chunk))
        else:
            if not finished:
                raise ConnectionError("the connection closed before the answer was complete")
        events.put(("end", None))
    except Exception as error:  # noqa: BLE001 - handed to the caller's thread, which explains it
        if not call.aborted:
            events.put(("broke", error))


class _Refused(Exception):
    """An HTTP error answer (or an error event in the stream): its status and the server's own message."""

    def __init__(self, status_code: int, body: str) -> None:
        self.status_code = status_code
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = body
        if isinstance(decoded, dict):
            inner = decoded.get("error", decoded)
            decoded = inner.get("message", inner) if isinstance(inner, dict) else inner
        self.message = str(decoded)[:500]
        super().__init__(f"{status_code}: {self.message}")


class StreamInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt (Ctrl-C, kernel interrupt) that arrived during a stream, carrying what streamed so
    far, so that a conversation can keep it before the interrupt goes on to stop the caller's loop."""

    def __init__(self, result: StreamResult) -> None:
        super().__init__()
        self.result = result
        self.partial: object = None  # the Reply a session kept of it (history and transcript), if any


class _Call:
    """The shared state of one request between the caller and the worker: whether it was aborted, and the
    connected socket an abort shuts. Shutting (unlike closing) wakes a connect, a prefill wait or a read
    blocked in another thread at once, and tells the server the client left, so vLLM aborts the request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: _socket.socket | None = None
        self.aborted = False

    def attach(self, sock: _socket.socket | None) -> bool:
        """Hand over the connected socket; False when the call was aborted before it connected."""
        with self._lock:
            if not self.aborted:
                self._sock = sock
                return True
        return False

    def abort(self) -> None:
        with self._lock:
            self.aborted, sock = True, self._sock
        if sock is None:  # not connected yet: the worker gives up as soon as it is (see attach)
            return
        try:  # the base class's shutdown: an SSL socket's own would tear down its state under the reader
            _socket.socket.shutdown(sock, _socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the worker


def _result(parts: list[str], finish: str | None, usage: Any, started: float, first: float | None,
            cancelled: bool) -> StreamResult:
    ended = time.monotonic()
    completion = usage.get("completion_tokens") if usage else None
    rate = None
    if completion and first is not None and ended - first >= MIN_RATE_WINDOW and completion > 1:
        rate = (completion - 1) / (ended - first)
    return StreamResult("".join(parts), finish, usage.get("prompt_tokens") if usage else None, completion,
                        None if first is None else first - started, rate, ended - started, cancelled)


def _status_message(endpoint: Endpoint, error: Any) -> str:
    status = getattr(error, "status_code", None)
    body = getattr(error, "message", str(error))
    if status == 401:
        return (f"The endpoint {endpoint.base_url} refused the API key (401). Pass the right one with "
                "--api-key-env NAME.")
    if status == 404:
        return (f"The endpoint {endpoint.base_url} does not serve a model named {endpoint.model!r} (404: {body}). "
                "List what it serves with `sage ps` or GET /v1/models.")
    if status == 400 and "context length" in str(body):
        return (f"The request does not fit the context window of {endpoint.model!r} (400: {body}). Lower "
                "--max-tokens, shorten the question, or clear the history (/reset in `sage chat`).")
    return f"The model at {endpoint.base_url} refused the request ({status}: {body})."
