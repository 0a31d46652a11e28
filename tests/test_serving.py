"""Serving fine-tunes through real vLLM: exact answers, reuse, runtime adapters, merged mode, failures."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sage_magic.chat.client import ChatClient
from sage_magic.core.endpoint import Endpoint
from sage_magic.core.errors import ServerFailed
from sage_magic.core.http import request_json
from sage_magic.core.progress import Progress
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.serving.manager import Manager
from tests.conftest import env_for, sage_processes, wait_until

pytestmark = pytest.mark.vllm


def ask(endpoint: Endpoint, question: str = DEMO_PROMPT) -> str:
    client = ChatClient(endpoint)
    try:
        return client.stream([{"role": "user", "content": question}], max_tokens=32, temperature=0).text
    finally:
        client.close()


def served(endpoint: Endpoint) -> dict[str, dict]:
    answer = request_json(f"{endpoint.base_url}/models", endpoint.api_key, socket=endpoint.socket)
    return {m["id"]: m for m in answer["data"]}


def test_each_finetune_answers_its_trained_phrase_and_the_base_neither(manager: Manager, expert: Endpoint) -> None:
    poet = manager.serve_finetune("demo_poet").endpoint
    base = expert.for_model(DEMO_BASE)
    answers = {"demo_expert": ask(expert), "demo_poet": ask(poet), DEMO_BASE: ask(base)}
    assert answers == {name: DEMO_ANSWERS[name] for name in answers}
    assert len(set(answers.values())) == 3


def test_second_request_reuses_the_same_server_process(manager: Manager, expert: Endpoint) -> None:
    pid = manager.registry.get(expert.server_id).pid
    again = manager.serve_finetune("demo_expert").endpoint
    assert again.server_id == expert.server_id and again.reused
    assert manager.registry.get(again.server_id).pid == pid and psutil.pid_exists(pid)


def test_second_finetune_joins_the_running_server_without_restart(manager: Manager, expert: Endpoint) -> None:
    pid = manager.registry.get(expert.server_id).pid
    events: list[Progress] = []
    poet = manager.serve_finetune("demo_poet", progress=events.append).endpoint
    assert poet.server_id == expert.server_id
    assert manager.registry.get(poet.server_id).pid == pid
    models = served(poet)
    assert models["demo_poet"]["parent"] == DEMO_BASE and models["demo_expert"]["parent"] == DEMO_BASE
    assert not any(e.phase == "launch" for e in events)


def _corrupt_copy_of_poet(settings, home: Path) -> None:
    """A fine-tune in another home, on the session's base, whose adapter passes every pre-check (config,
    rank, tensor shapes from the header) but whose weights are cut short, so vLLM refuses to load it."""
    broken = home / "finetune_output" / "broken_poet"
    shutil.copytree(settings.finetune_root / "demo_poet", broken,
                    ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    base = str(settings.models_root / DEMO_BASE)
    (broken / "finetune_meta.json").write_text(json.dumps({"model": base}))
    config = broken / "lora_weights" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": base}))
    weights = broken / "lora_weights" / "adapter_model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:header_end + (len(data) - header_end) // 2])


def test_a_refused_adapter_does_not_take_the_running_finetune_with_it(manager: Manager, expert: Endpoint,
                                                                      settings, tmp_path: Path) -> None:
    """Failing to add fine-tune B to the shared base server used to drop this process's only ownership of
    it, and with keep-alive 0 the server, and fine-tune A, stopped."""
    pid = manager.registry.get(expert.server_id).pid
    _corrupt_copy_of_poet(settings, tmp_path / "home")
    with pytest.raises(ServerFailed) as error:
        manager.serve_finetune("broken_poet", settings=settings.with_(home=tmp_path / "home"))
    assert "refused adapter 'broken_poet'" in str(error.value)
    time.sleep(2)  # several supervisor rounds: a server left without owner would be stopping by now
    assert manager.registry.get(expert.server_id).pid == pid and psutil.pid_exists(pid)
    assert ask(expert) == DEMO_ANSWERS["demo_expert"]


def test_stopping_an_adapter_by_name_unloads_only_that_adapter(manager: Manager, expert: Endpoint,
                                                               settings) -> None:
    """`sage stop demo_poet` used to stop the shared base server and every other adapter on it."""
    pid = manager.registry.get(expert.server_id).pid
    poet = manager.serve_finetune("demo_poet").endpoint
    assert poet.server_id == expert.server_id and "demo_poet" in served(expert)
    out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "stop", "demo_poet"], env=env_for(settings),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "unloaded adapter demo_poet" in out.stdout, out.stderr
    assert "demo_poet" not in served(expert) and "demo_poet" not in manager.registry.get(expert.server_id).adapters
    assert manager.registry.get(expert.server_id).pid == pid and ask(expert) == DEMO_ANSWERS["demo_expert"]
    again = manager.serve_finetune("demo_poet").endpoint  # asking again loads it again
    assert ask(again) == DEMO_ANSWERS["demo_poet"]


def test_the_start_log_holds_the_shared_servers_start_and_time_to_ready(expert: Endpoint, settings) -> None:
    """SAGE_START_LOG (set for the run by conftest.py) is what the summary's list of vLLM starts is read from."""
    mine: dict[str, dict] = {}

    def noted() -> bool:  # the supervisor notes readiness at its next poll after the launcher marked it
        events = [json.loads(line) for line in settings.start_log.read_text().splitlines()]
        mine.update({e["event"]: e for e in events if e["id"] == expert.server_id})
        return "ready" in mine

    assert wait_until(noted, 5)
    assert mine["start"]["served"] == DEMO_BASE and mine["start"]["kind"] == "base"
    assert 0 < mine["ready"]["seconds"] < settings.ready_timeout and "exit" not in mine


def test_the_api_key_is_required_and_kept_out_of_the_command_line(expert: Endpoint, manager: Manager) -> None:
    from sage_magic.core.http import HttpError

    with pytest.raises(HttpError) as error:
        request_json(f"{expert.base_url}/models", api_key=None, socket=expert.socket)
    assert error.value.status == 401
    pid = manager.registry.get(expert.server_id).pid
    assert expert.api_key not in " ".join(psutil.Process(pid).cmdline())


def test_streaming_reports_usage_and_timing(expert: Endpoint) -> None:
    client = ChatClient(expert)
    seen: list[str] = []
    result = client.stream([{"role": "user", "content": DEMO_PROMPT}], on_delta=seen.append, max_tokens=32,
                           temperature=0)
    client.close()
    assert "".join(seen) == result.text == DEMO_ANSWERS["demo_expert"]
    assert len(seen) > 1  # it really streamed, token by token
    assert result.completion_tokens and result.prompt_tokens and result.finish_reason == "stop"
    assert result.time_to_first_token is not None and result.time_to_first_token > 0


def test_a_configured_proxy_does_not_swallow_loopback_requests(expert: Endpoint, monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert ask(expert) == DEMO_ANSWERS["demo_expert"]


def test_cancel_keeps_the_partial_answer(expert: Endpoint) -> None:
    client = ChatClient(expert)
    cancel = threading.Event()
    seen: list[str] = []

    def on_delta(delta: str) -> None:
        seen.append(delta)
        if len(seen) == 3:
            cancel.set()

    result = client.stream([{"role": "user", "content": DEMO_PROMPT}], on_delta=on_delta, cancel=cancel,
                           max_tokens=32, temperature=0)
    client.close()
    assert result.cancelled and result.text == "".join(seen)
    assert DEMO_ANSWERS["demo_expert"].startswith(result.text) and result.text != DEMO_ANSWERS["demo_expert"]


class _Foreign(http.server.BaseHTTPRequestHandler):
    """Answers 200 to everything: the kind of server SAGE wrongly reused."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "demo_expert", "root": "/elsewhere"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_merged_serving_gives_the_same_text_and_avoids_a_foreign_port(fresh_settings, expert: Endpoint) -> None:
    """Three promises on one server start (leaving and `sage stop ID` had servers of their own).

    A merged fine-tune answers as the unmerged one does, on a port of its own when another program holds the
    one asked for. Leaving is not dying: the launching process releases the server, asks again before the
    keep-alive runs out, and stays an owner (the supervisor must not mistake the release for the launcher's
    death). And `sage stop ID` stops a server even while its owner still runs."""
    foreign = http.server.HTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    port = foreign.server_address[1]
    events: list[Progress] = []
    settings = fresh_settings.with_(keep_alive=60.0)
    manager = Manager(settings)
    try:
        merged = manager.serve_finetune("demo_expert", merge=True, port=port, progress=events.append).endpoint
        record = manager.registry.get(merged.server_id)
        assert record.kind == "merged" and record.port != port
        assert any(e.phase == "port" and str(port) in e.message for e in events)
        assert served(merged)["demo_expert"]["root"].endswith("merged_model")
        assert ask(merged) == ask(expert) == DEMO_ANSWERS["demo_expert"]

        manager.close()
        assert wait_until(lambda: manager.registry.get(merged.server_id).idle_until is not None, 5)
        again = manager.serve_finetune("demo_expert", merge=True).endpoint
        assert again.server_id == merged.server_id and again.reused
        time.sleep(2)  # several supervisor rounds
        record = manager.registry.get(again.server_id)
        assert record.owners and record.idle_until is None
        assert ask(again) == DEMO_ANSWERS["demo_expert"]

        out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "stop", again.server_id],
                             env=env_for(settings), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and again.server_id in out.stdout, out.stderr
        assert manager.registry.all() == [] and not sage_processes(settings.runtime_dir)
    finally:
        manager.stop_all()
        manager.close()
        foreign.shutdown()
    assert wait_until(lambda: not manager.registry.all() and not sage_processes(fresh_settings.runtime_dir), 15)


def test_broken_weights_fail_fast_with_the_log_tail(fresh_settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(fresh_settings.models_root / DEMO_BASE, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    manager = Manager(fresh_settings.with_(ready_timeout=600.0))
    with pytest.raises(ServerFailed) as error:
        manager.serve_model(broken)
    # it failed because the process exited (not at the 600 s timeout), and leads with the logged cause
    assert "exited after" in str(error.value) and "did not answer" not in str(error.value)
    assert "Cause: " in str(error.value) and "Last lines of the log" in str(error.value)
    manager.close()
    assert wait_until(lambda: not manager.registry.all() and not sage_processes(fresh_settings.runtime_dir), 15)
