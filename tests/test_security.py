"""No key, no model: what another local user can reach of a server we started, asked of a real vLLM.

vLLM's own key check covers only /v1 (``POST /invocations`` used to answer a chat without any key). Our
servers listen on a Unix socket inside the 0700 runtime folder, and a TCP port, when asked for, is the
gateway that checks the key on every route. The session server's settings ask for a port, so it has both.
What a start and stop leaves behind (the log only) is checked by test_cli's one-shot ask, on its own server.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from sage_magic.core.http import HttpError, request_json, request_text
from sage_magic.finetune.demo import DEMO_PROMPT
from sage_magic.serving.manager import Endpoint, Manager
from tests.conftest import env_for

pytestmark = pytest.mark.vllm

CHAT = {"model": "demo_expert", "messages": [{"role": "user", "content": DEMO_PROMPT}], "max_tokens": 16}
#: Routes a hand-made attack used, asked whether or not the server's OpenAPI lists them.
ATTACKED = [("POST", "/invocations", CHAT), ("POST", "/tokenize", {"model": "demo_expert", "prompt": "hi"}),
            ("POST", "/detokenize", {"model": "demo_expert", "tokens": [1, 2]}), ("GET", "/metrics", None),
            ("GET", "/version", None), ("GET", "/health", None), ("GET", "/docs", None),
            ("GET", "/openapi.json", None), ("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
            ("POST", "/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})]


def _every_route(expert: Endpoint) -> list[tuple[str, str, dict | None]]:
    """Every method and path the server's own OpenAPI document lists (asked over its socket), plus ATTACKED."""
    spec = request_json("http://localhost/openapi.json", socket=expert.socket)
    routes = list(ATTACKED)
    for path, methods in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        routes += [(method.upper(), concrete, CHAT if method.upper() in ("POST", "PUT") else None)
                   for method in methods]
    return routes


def test_over_tcp_every_route_without_the_key_gives_nothing(manager: Manager, expert: Endpoint) -> None:
    record = manager.registry.get(expert.server_id)
    assert record.port is not None and record.tcp_url is not None
    root = record.tcp_url.rsplit("/v1", 1)[0]
    routes = _every_route(expert)
    assert len(routes) > len(ATTACKED)
    for key in (None, "wrong-key"):
        for method, path, body in routes:
            with pytest.raises(HttpError) as refused:
                request_text(f"{root}{path}", key, body if method != "GET" else None, timeout=30)
            assert refused.value.status == 401, (method, path, refused.value)
            assert "choices" not in refused.value.body and "tokens" not in refused.value.body
            assert "demo_expert" not in refused.value.body
    # the same route with the key does generate: the 401 above is the gateway, not a missing route
    answer = request_json(f"{root}/invocations", expert.api_key, CHAT, timeout=120)
    assert answer["choices"][0]["message"]["content"].strip()


def test_the_socket_sits_in_folders_only_its_owner_can_enter(manager: Manager, expert: Endpoint) -> None:
    runtime = manager.settings.runtime_dir
    sock = Path(expert.socket)
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert sock.parent == runtime / "s" / expert.server_id
    for folder in (runtime, runtime / "s", sock.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        assert folder.stat().st_uid == os.getuid()


def test_the_api_server_listens_on_no_tcp_port(manager: Manager, expert: Endpoint) -> None:
    """Only the gateway, in the supervisor, has a TCP port. (vLLM's CPU worker keeps torch.distributed
    rendezvous ports of its own on 127.0.0.1; those carry no HTTP API.)"""
    record = manager.registry.get(expert.server_id)
    listening = [c for c in psutil.Process(record.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening == []
    gateway = [c.laddr for c in psutil.Process(record.supervisor_pid).net_connections("inet")
               if c.status == psutil.CONN_LISTEN]
    assert gateway == [("127.0.0.1", record.port)]


def test_the_key_shows_in_no_log_listing_or_command_line(settings, manager: Manager, expert: Endpoint) -> None:
    record = manager.registry.get(expert.server_id)
    assert expert.api_key not in Path(record.log_path).read_text(errors="replace")
    ps = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "ps", "--json"], capture_output=True,
                        text=True, env=env_for(settings), timeout=120)
    assert ps.returncode == 0 and json.loads(ps.stdout)
    assert expert.api_key not in ps.stdout
    for pid in (record.pid, record.supervisor_pid):
        assert expert.api_key not in " ".join(psutil.Process(pid).cmdline())
    assert expert.api_key not in repr(record) + repr(expert) + repr(manager.settings)
