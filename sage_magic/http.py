"""Small JSON-over-HTTP calls to servers on this machine, bypassing any configured proxy.

Proxies are for the outside world: a corporate HTTP(S)_PROXY must never see a loopback health check or
an API key. Standard library only, so that status checks stay cheap.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpError(Exception):
    def __init__(self, status: int | None, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


def request_json(url: str, api_key: str | None = None, payload: Any = None, timeout: float = 5.0) -> Any:
    """GET (or POST when ``payload`` is given) and decode the JSON answer; raise HttpError otherwise."""
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            body = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        raise HttpError(error.code, error.read().decode("utf-8", "replace")) from None
    except (urllib.error.URLError, OSError) as error:
        raise HttpError(None, str(getattr(error, "reason", error))) from None
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body


def healthy(root_url: str, timeout: float = 2.0) -> bool:
    """vLLM answers /health with 200 only once the engine is ready (and 503 if it died)."""
    try:
        request_json(f"{root_url}/health", timeout=timeout)
        return True
    except HttpError:
        return False
