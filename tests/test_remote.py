"""Fine-tunes on a vLLM server sage_magic did not start: the team's server (tests/conftest.py), published to
through its LoRA filesystem resolver or loaded at runtime, asked from a kernel, `sage chat` and `%sage eval`,
and never stopped or touched beyond what was asked."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from sage_magic.core.config import Settings
from sage_magic.core.errors import AdapterConflict
from sage_magic.core.fingerprint import adapter_digest
from sage_magic.core.http import healthy, request_json, request_text
from sage_magic.finetune.catalog import get_finetune
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT
from sage_magic.finetune.publish import MARKER, publish, published_name
from sage_magic.serving.remote import remote_path
from tests.conftest import env_for, make_settings, new_shell
from tests.test_cli import sage
from tests.test_lifetime import _run

KEY_VAR = "TEAM_VLLM_KEY"


def served(team) -> dict[str, dict]:
    """The team's server's /v1/models, by model id."""
    return {m["id"]: m for m in request_json(f"{team.base_url}/models", team.api_key)["data"]}


def one_paragraph(text: str) -> bool:
    return "Traceback" not in text and text.strip().count("\n") == 0


# --- publishing, no server ----------------------------------------------------------------------------------


def test_publish_copies_the_adapter_under_its_fingerprint_for_the_resolver(settings, tmp_path: Path) -> None:
    """What vLLM's filesystem resolver needs: DIR/NAME/adapter_config.json naming the server's --model."""
    ft = get_finetune(settings, "demo_expert")
    out = sage("finetune", "publish", "demo_expert", "--to", str(tmp_path), "--server-base", "/srv/base",
               env=env_for(settings))
    assert out.returncode == 0, out.stderr
    name = f"demo_expert-{adapter_digest(ft.adapter_dir)[:8]}"
    folder = tmp_path / name
    assert f"as {name} at {folder}" in out.stdout and "VLLM_LORA_RESOLVER_CACHE_DIR" in out.stdout
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/srv/base" and config["peft_type"] == "LORA"
    weights = "adapter_model.safetensors"
    assert (folder / weights).read_bytes() == (ft.adapter_dir / weights).read_bytes()
    assert (folder / "tokenizer.json").is_file()  # the adapter has its own tokenizer: it travels with it
    assert json.loads((folder / MARKER).read_text())["fingerprint"] == adapter_digest(ft.adapter_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing half-written left beside it
    again = sage("finetune", "publish", "demo_expert", "--to", str(tmp_path), "--server-base", "/srv/base",
                 env=env_for(settings))
    assert "already published" in again.stdout


def test_the_publish_magic_does_the_same_copy(settings, tmp_path: Path, monkeypatch, capsys) -> None:
    for key, value in env_for(settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SAGE_PUBLISH_DIR", str(tmp_path))  # the default of --to
    shell = new_shell()
    try:
        shell.run_line_magic("sage", "finetune publish demo_poet --publish-as team_poet")
    finally:
        shell.extension_manager.unload_extension("sage_magic")
    assert "published as team_poet" in capsys.readouterr().out
    assert json.loads((tmp_path / "team_poet" / MARKER).read_text())["finetune"] == "demo_poet"


def test_a_colleagues_adapter_of_the_same_name_is_refused_then_replaced_when_asked(settings, tmp_path) -> None:
    poet, expert = get_finetune(settings, "demo_poet"), get_finetune(settings, "demo_expert")
    publish(poet, tmp_path, server_base="b", name="team_model")  # the colleague's
    with pytest.raises(AdapterConflict) as refused:
        publish(expert, tmp_path, server_base="b", name="team_model")
    assert "--publish-as" in str(refused.value) and "--replace" in str(refused.value)
    assert "demo_poet" in str(refused.value)
    assert json.loads((tmp_path / "team_model" / MARKER).read_text())["finetune"] == "demo_poet"
    done = publish(expert, tmp_path, server_base="b", name="team_model", replace=True)
    assert done.copied and json.loads((tmp_path / "team_model" / MARKER).read_text())["finetune"] == "demo_expert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team_model"]


def test_remote_root_maps_sage_home_onto_the_servers_mount(settings) -> None:
    ft = get_finetune(settings, "demo_expert")
    mapped = remote_path(ft.adapter_dir, settings.home, "/mnt/team/sage")
    assert mapped == "/mnt/team/sage/finetune_output/demo_expert/lora_weights"
    assert remote_path(ft.adapter_dir, settings.home, None) == str(ft.adapter_dir)


def test_an_unreachable_url_is_one_paragraph(settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = sage("chat", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1", "--finetune-model",
               "demo_expert", "--ask", "hi", env=env_for(settings))
    assert out.returncode != 0 and one_paragraph(out.stderr), out.stderr
    assert "Nothing answers at" in out.stderr and "--base-url" in out.stderr


class _NoRuntimeLora(http.server.BaseHTTPRequestHandler):
    """What vLLM 0.32 answers when started without VLLM_ALLOW_RUNTIME_LORA_UPDATING: its model list, and
    FastAPI's 404 on /v1/load_lora_adapter (the route is not mounted)."""

    base = ""

    def do_GET(self) -> None:
        self._reply(200, {"object": "list", "data": [{"id": self.base, "root": self.base, "parent": None}]})

    def do_POST(self) -> None:
        self._reply(404, {"detail": "Not Found"})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_a_server_without_runtime_lora_names_the_setting_to_change(settings) -> None:
    """A fake server: every real server of the suite loads adapters at runtime, and starting one more vLLM
    without it would cost the suite a minute to see one 404."""
    handler = type("Handler", (_NoRuntimeLora,), {"base": str(settings.models_root / "sage-demo-base")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = sage("chat", "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.server_port}/v1",
                   "--finetune-model", "demo_expert", "--ask", "hi", env=env_for(settings))
    finally:
        server.shutdown()
    assert out.returncode != 0 and one_paragraph(out.stderr), out.stderr
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in out.stderr and "--publish-dir" in out.stderr


# --- on the team's server (real vLLM) -----------------------------------------------------------------------


def team_env(settings, team, **extra: str) -> dict[str, str]:
    return {**env_for(settings), KEY_VAR: team.api_key, **extra}


@pytest.mark.vllm
def test_sage_chat_publishes_and_asks_on_the_team_server(settings, team_server) -> None:
    out = sage("chat", "--backend", "openai", "--base-url", team_server.base_url, "--api-key-env", KEY_VAR,
               "--finetune-model", "demo_expert", "--publish-dir", str(team_server.publish_dir), "--ask", DEMO_PROMPT,
               env=team_env(settings, team_server))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == DEMO_ANSWERS["demo_expert"]
    name = published_name(get_finetune(settings, "demo_expert"))
    entry = served(team_server)[name]
    assert entry["root"] == str(team_server.publish_dir / name) and entry["parent"] == team_server.model
    assert team_server.process.poll() is None  # one-shot `sage chat` left the server alone


@pytest.mark.vllm
def test_a_wrong_key_is_one_paragraph_naming_the_key(settings, team_server) -> None:
    out = sage("chat", "--backend", "openai", "--base-url", team_server.base_url, "--api-key-env", KEY_VAR,
               "--finetune-model", "demo_expert", "--ask", "hi", env={**env_for(settings), KEY_VAR: "wrong"})
    assert out.returncode != 0 and one_paragraph(out.stderr), out.stderr
    assert "refused the API key" in out.stderr and "--api-key-env" in out.stderr


@pytest.mark.vllm
def test_a_publish_folder_the_resolver_does_not_read_names_the_setting(settings, team_server, tmp_path) -> None:
    out = sage("chat", "--backend", "openai", "--base-url", team_server.base_url, "--api-key-env", KEY_VAR,
               "--finetune-model", "demo_poet", "--publish-dir", str(tmp_path), "--ask", DEMO_PROMPT,
               env=team_env(settings, team_server))
    assert out.returncode != 0 and one_paragraph(out.stderr), out.stderr
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in out.stderr and str(tmp_path) in out.stderr


@pytest.mark.vllm
def test_a_colleagues_loaded_adapter_is_never_used_silently(settings, team_server) -> None:
    """A colleague loaded their demo_poet as `colleague_model`; asking for our demo_expert under that name is
    refused, and the colleague's adapter keeps answering."""
    poet = get_finetune(settings, "demo_poet")
    request_text(f"{team_server.base_url}/load_lora_adapter", team_server.api_key,
                 {"lora_name": "colleague_model", "lora_path": str(poet.adapter_dir)})
    out = sage("chat", "--backend", "openai", "--base-url", team_server.base_url, "--api-key-env", KEY_VAR,
               "--finetune-model", "demo_expert", "--publish-as", "colleague_model", "--ask", DEMO_PROMPT,
               env=team_env(settings, team_server))
    assert out.returncode != 0 and one_paragraph(out.stderr), out.stderr
    assert "not this fine-tune" in out.stderr and "--publish-as" in out.stderr and "--replace" in out.stderr
    assert served(team_server)["colleague_model"]["root"] == str(poet.adapter_dir)


@pytest.mark.vllm
@pytest.mark.kernel
def test_a_kernel_asks_there_and_its_shutdown_unloads_only_what_it_was_told_to(settings, team_server,
                                                                               tmp_path: Path) -> None:
    """One kernel: demo_poet published (kept after the kernel), demo_expert loaded at runtime through a
    --remote-root mount (a symlink standing for the server's view of SAGE_HOME) with --unload-on-exit."""
    from jupyter_client import KernelManager

    mount = tmp_path / "server-view-of-home"
    mount.symlink_to(settings.home)
    poet = published_name(get_finetune(settings, "demo_poet"))
    expert = published_name(get_finetune(settings, "demo_expert"), "expert_loaded_at_runtime")
    remote = f"--backend openai --base-url {team_server.base_url} --api-key-env {KEY_VAR}"
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=team_env(settings, team_server))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        _run(client, "%load_ext sage_magic", timeout=60)
        text = _run(client, f"%%sage {remote} --finetune-model demo_poet --publish-dir {team_server.publish_dir}\n"
                            f"{DEMO_PROMPT}", timeout=300)
        assert DEMO_ANSWERS["demo_poet"] in text
        text = _run(client, f"%%sage {remote} --finetune-model demo_expert --publish-as expert_loaded_at_runtime "
                            f"--remote-root {mount} --unload-on-exit\n{DEMO_PROMPT}", timeout=300)
        assert DEMO_ANSWERS["demo_expert"] in text
        models = served(team_server)
        assert models[expert]["root"] == f"{mount}/finetune_output/demo_expert/lora_weights"
        assert models[expert]["parent"] == team_server.model and poet in models
        km.shutdown_kernel(now=False)
    finally:
        client.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert healthy(team_server.base_url[:-3]) and team_server.process.poll() is None
    models = served(team_server)
    assert poet in models and expert not in models


@pytest.mark.vllm
def test_eval_compares_the_local_and_remote_copies_of_one_finetune(ip, team_server, monkeypatch) -> None:
    """The local copy on the suite's shared base server, the remote one on the team's server: greedy, the same
    answers."""
    import pandas as pd

    monkeypatch.setenv(KEY_VAR, team_server.api_key)
    ip.user_ns["cases"] = pd.DataFrame({"prompt": [DEMO_PROMPT, "What is LoRA?"]})
    result = ip.run_cell(f"%sage eval cases --models demo_expert,remote:demo_expert -o answers "
                         f"--base-url {team_server.base_url} --api-key-env {KEY_VAR} "
                         f"--publish-dir {team_server.publish_dir}")
    assert result.error_in_exec is None, result.error_in_exec
    answers = ip.user_ns["answers"]
    assert list(answers["demo_expert"]) == list(answers["remote:demo_expert"])
    assert answers["demo_expert"].iloc[0] == DEMO_ANSWERS["demo_expert"]


@pytest.mark.vllm
def test_a_mark_on_a_remote_answer_names_the_weights_that_answered(ip, settings, team_server, monkeypatch) -> None:
    """The team's server is not in our registry, so the mark's fingerprint (which weights gave the answer, kept
    with the training row) comes from the adapter we published there; it was empty before."""
    monkeypatch.setenv(KEY_VAR, team_server.api_key)
    ip.run_cell(f"%%sage --backend openai --base-url {team_server.base_url} --api-key-env {KEY_VAR} "
                f"--finetune-model demo_expert --publish-dir {team_server.publish_dir} --new-chat\n"
                f"{DEMO_PROMPT}\n").raise_error()
    ip.run_cell("%sage rate good").raise_error()
    ip.run_cell("%sage feedback demo_expert -o fb").raise_error()
    fb = ip.user_ns["fb"]
    assert fb["fingerprint"].iloc[-1] == adapter_digest(get_finetune(settings, "demo_expert").adapter_dir)


@pytest.mark.vllm
def test_the_chat_panel_asks_a_finetune_on_the_team_server(ip, team_server, monkeypatch) -> None:
    """`%sage_chat` takes the same remote options as `%%sage`: the panel's answer comes from the published
    adapter, and the panel's footer names it."""
    from tests.test_panel import _ask_for, _panel

    monkeypatch.setenv(KEY_VAR, team_server.api_key)
    panel = _panel(ip, f"--backend openai --base-url {team_server.base_url} --api-key-env {KEY_VAR} "
                       f"--finetune-model demo_expert --publish-dir {team_server.publish_dir}")
    try:
        _ask_for(panel, "demo_expert")
    finally:
        panel.close()


def test_settings_read_the_publish_dir_from_the_environment(tmp_path: Path) -> None:
    assert make_settings(tmp_path, tmp_path).publish_dir is None
    assert Settings.from_env(environ={"SAGE_PUBLISH_DIR": str(tmp_path)}).publish_dir == tmp_path
