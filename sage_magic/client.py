"""A thin streaming chat client over the ``openai`` package, for our servers and any compatible endpoint.

It measures what a person asks about (time to first token, tokens per second, token usage) and can be
cancelled between chunks, keeping whatever text already arrived. Requests to loopback addresses ignore
HTTP(S)_PROXY, which would otherwise swallow them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .endpoint import Endpoint
from .errors import SageError, ServerFailed
from .http import HttpError, request_json


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
    def __init__(self, endpoint: Endpoint, timeout: float = 600.0) -> None:
        import httpx
        import openai

        self.endpoint = endpoint
        self.timeout = timeout
        transport = httpx.HTTPTransport(uds=endpoint.socket) if endpoint.socket else None
        http_client = httpx.Client(trust_env=not endpoint.is_local, timeout=timeout, transport=transport)
        self._openai = openai
        self._transport_error = httpx.HTTPError
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "EMPTY",
                                     http_client=http_client, max_retries=0)

    def close(self) -> None:
        self._client.close()

    def max_model_len(self) -> int | None:
        """The served model's context length, from /v1/models (None if the server does not say)."""
        try:
            models = request_json(f"{self.endpoint.base_url}/models", self.endpoint.api_key,
                                  socket=self.endpoint.socket) or {}
        except HttpError:
            return None
        by_id = {m.get("id"): m for m in models.get("data", [])}
        model = by_id.get(self.endpoint.model, {})
        # a LoRA adapter's entry carries no length of its own: it has its base's window
        return model.get("max_model_len") or by_id.get(model.get("parent"), {}).get("max_model_len")

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
        """Stream one chat completion. Ctrl-C / kernel interrupt or ``cancel`` stop it, keeping the text."""
        started = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        finish = None
        usage = None
        cancelled = False
        openai = self._openai
        try:
            stream = self._client.chat.completions.create(
                model=self.endpoint.model, messages=messages, stream=True,
                stream_options={"include_usage": True}, **params)
        except openai.APITimeoutError:
            raise ServerFailed(f"The model at {self.endpoint.base_url} did not answer within {self.timeout:g} s. "
                               "`sage logs` shows what the server is doing; a busy CPU server may need a longer "
                               "timeout.") from None
        except openai.APIConnectionError as error:
            raise ServerFailed(f"Cannot reach the model at {self.endpoint.base_url} ({error}). "
                               "`sage ps` shows running servers; start one again or check --base-url.") from None
        except openai.APIStatusError as error:
            raise SageError(_status_message(self.endpoint, error)) from None
        try:
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta.content or ""
                    if delta:
                        if first is None:
                            first = time.monotonic()
                        parts.append(delta)
                        if on_delta is not None:
                            on_delta(delta)
                    finish = choice.finish_reason or finish
        except KeyboardInterrupt:
            cancelled = True
        except (openai.APIError, self._transport_error) as error:
            raise ServerFailed(f"The model at {self.endpoint.base_url} broke off its answer ({error}); "
                               f"the partial answer was: {''.join(parts)!r}. `sage logs` shows why.") from None
        finally:
            stream.close()
        ended = time.monotonic()
        completion = usage.completion_tokens if usage else None
        rate = None
        if completion and first is not None and ended > first and completion > 1:
            rate = (completion - 1) / (ended - first)
        return StreamResult("".join(parts), finish, usage.prompt_tokens if usage else None, completion,
                            None if first is None else first - started, rate, ended - started, cancelled)


def _status_message(endpoint: Endpoint, error: Any) -> str:
    status = getattr(error, "status_code", None)
    body = getattr(error, "message", str(error))
    if status == 401:
        return f"The endpoint {endpoint.base_url} refused the API key (401). Pass the right one with --api-key."
    if status == 404:
        return (f"The endpoint {endpoint.base_url} does not serve a model named {endpoint.model!r} (404: {body}). "
                "List what it serves with `sage ps` or GET /v1/models.")
    return f"The model at {endpoint.base_url} refused the request ({status}: {body})."
