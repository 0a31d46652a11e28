"""Bad input is refused at the edge with one clear sentence (exit 2 for usage errors), never a traceback, a
hang or a silent wrong result; a record that cannot be read back never breaks `sage ps`."""

from __future__ import annotations

import http.server
import json
import math
import os
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sage_magic.cli.main import main
from sage_magic.core.config import Settings, default_runtime_dir, parse_duration
from sage_magic.core.errors import SageError
from sage_magic.core.files import write_json_atomic
from sage_magic.serving.launch import server_command
from sage_magic.serving.registry import Owner, Registry, ServerRecord
from tests.conftest import marked


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `sage ARGV`; it must stop with argparse's exit 2; return what it printed on stderr."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "70000", "-1", "eighty"])
def test_a_port_outside_1_to_65535_is_a_usage_error(port: str, capsys) -> None:
    err = _usage_error(["chat", "--finetune-port", port, "--ask", "hi"], capsys)
    assert "1 to 65535" in err and "Traceback" not in err
    err = _usage_error(["finetune", "chat", "demo_expert", "--port", port, "--ask", "hi"], capsys)
    assert "1 to 65535" in err


@pytest.mark.parametrize("port", ["0", "70000"])
def test_a_bad_port_in_the_environment_is_refused(port: str) -> None:
    with pytest.raises(SageError, match="SAGE_FINETUNE_PORT must be a port number from 1 to 65535"):
        Settings.from_env({"SAGE_FINETUNE_PORT": port})


def test_no_port_unless_asked() -> None:
    assert Settings.from_env({}).port is None
    assert Settings.from_env({"SAGE_FINETUNE_PORT": "8100"}).port == 8100


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "infs"])
def test_keep_alive_nan_and_inf_are_refused(text: str, capsys) -> None:
    with pytest.raises(SageError, match="not a duration|Cannot read"):
        parse_duration(text)
    with pytest.raises(SageError, match="SAGE_KEEP_ALIVE|duration|Cannot read"):
        Settings.from_env({"SAGE_KEEP_ALIVE": text})
    assert "keep-alive" in _usage_error(["chat", "--keep-alive", text, "--ask", "hi"], capsys)


@pytest.mark.parametrize("number", ["-1", "0", "many"])
def test_logs_takes_at_least_one_line(number: str, capsys) -> None:
    assert "-n takes a whole number of lines, 1 or more" in _usage_error(["logs", "abc", "-n", number], capsys)


@pytest.mark.parametrize("args,option,instead", [
    ("--host 0.0.0.0", "--host", "--finetune-port"),
    ("--port=9000", "--port", "--finetune-port"),
    ("--api-key k", "--api-key", "own random key"),
    ("--uds /tmp/x.sock", "--uds", "runtime folder"),
    ("--served-model-name other", "--served-model-name", "fine-tune's name"),
])
def test_vllm_args_that_the_manager_sets_are_refused(args: str, option: str, instead: str, capsys,
                                                     tmp_path: Path) -> None:
    err = _usage_error(["chat", "--vllm-arg", f"--enforce-eager {args}", "--ask", "hi"], capsys)
    assert f"may not set {option}" in err and instead in err
    with pytest.raises(SageError, match=f"SAGE_VLLM_ARGS may not set {option}"):
        Settings.from_env({"SAGE_VLLM_ARGS": args})
    # the engine API refuses them too, before anything starts
    settings = Settings.from_env({}, home=tmp_path, runtime_dir=tmp_path / "run")
    with pytest.raises(SageError, match=f"may not set {option}"):
        server_command(settings, tmp_path, "m", tmp_path / "s.sock", None, tuple(args.split()))


def test_vllm_arg_takes_a_flag_as_written_in_the_readme() -> None:
    """`--vllm-arg '--enforce-eager'` used to fail in argparse ("expected one argument"). Here it gets as far
    as the next real problem (no --base-url for --backend openai), which is a SageError, not a usage error."""
    env = {**os.environ, "SAGE_RUNTIME_DIR": "/tmp/unused-sage-run"}
    out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "chat", "--vllm-arg", "--enforce-eager",
                          "--vllm-arg", "--max-num-seqs 4", "--backend", "openai", "--ask", "hi"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "expected one argument" not in out.stderr and "--backend openai needs --base-url" in out.stderr


def test_chat_help_shows_its_examples_unbroken(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if line.rstrip().endswith("'") or line.strip().startswith("'")]


def test_the_runtime_folder_does_not_follow_xdg_or_tmpdir(monkeypatch, tmp_path: Path) -> None:
    expected = Path(f"/tmp/sage_magic-{os.getuid()}")
    for name in ("XDG_RUNTIME_DIR", "TMPDIR"):
        monkeypatch.setenv(name, str(tmp_path))
    assert default_runtime_dir() == expected
    assert Settings.from_env({"XDG_RUNTIME_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}).runtime_dir == expected
    assert Settings.from_env({"SAGE_RUNTIME_DIR": str(tmp_path / "mine")}).runtime_dir == tmp_path / "mine"


def test_a_runtime_folder_someone_else_could_have_prepared_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(SageError, match="writable by other users"):
        with Registry(loose).locked():
            pass
    if os.getuid() != 0:
        return  # only root can make a folder or a symlink that belongs to someone else
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    planted = tmp_path / "planted"  # another user's symlink to a folder of ours, at the predictable name
    planted.symlink_to(mine)
    os.lchown(planted, 65534, 65534)
    for folder in (foreign, planted):
        with pytest.raises(SageError, match="belongs to another user"):
            with Registry(folder).locked():
                pass
    assert list(mine.iterdir()) == []


def test_a_record_that_cannot_be_read_back_never_breaks_ps(tmp_path: Path, capsys, monkeypatch) -> None:
    """The state `--keep-alive nan` used to leave: a live server whose record holds NaN."""
    registry = Registry(tmp_path / "run")
    supervisor = marked("deadbeef")
    try:
        record = ServerRecord(id="deadbeef", kind="base", identity="x", model_path="/m", served_name="m",
                              host="127.0.0.1", port=None, api_key="secret", log_path=str(registry.log_path("x")),
                              supervisor_pid=supervisor.pid, keep_alive=math.nan, started_at=time.time(),
                              owners=[Owner.this_process()])
        with registry.locked():
            write_json_atomic(registry.servers / "deadbeef.json", record.to_json())
        monkeypatch.setenv("SAGE_RUNTIME_DIR", str(tmp_path / "run"))
        monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
        assert main(["ps"]) == 0
        assert main(["ps", "--json"]) == 0
        out = capsys.readouterr().out
        listing = json.loads(out[out.index("["):], parse_constant=lambda name: pytest.fail(f"{name} in ps --json"))
        assert listing == []
    finally:
        supervisor.kill()
        supervisor.wait()


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    from sage_magic.core.endpoint import Endpoint

    record = ServerRecord(id="ab", kind="base", identity="x", model_path="/m", served_name="m", host="127.0.0.1",
                          port=8000, api_key="s3cret-key", log_path="/l", supervisor_pid=1, keep_alive=0.0,
                          started_at=0.0)
    settings = Settings.from_env({}, home=tmp_path, runtime_dir=tmp_path, extra_env={"HF_TOKEN": "s3cret-token"})
    endpoint = Endpoint("http://localhost/v1", "s3cret-key", "m", socket="/run/s.sock")
    for thing in (record, settings, endpoint):
        assert "s3cret" not in repr(thing) and "s3cret" not in str(thing)
    assert "s3cret" not in repr([record, settings, endpoint])


class _NotVllm(http.server.BaseHTTPRequestHandler):
    """A fake server, because a real vLLM never answers /v1/models with a web page or a bare list."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = self.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("body", [b"<html>login</html>", b"[1, 2]", b'{"data": 5}'])
def test_a_200_that_is_not_a_model_list_is_a_clear_error(body: bytes, tmp_path: Path, monkeypatch) -> None:
    from sage_magic.core.errors import ServerFailed
    from sage_magic.serving.manager import Manager

    monkeypatch.setattr(_NotVllm, "body", body)
    path = str(tmp_path / "s.sock")
    server = socketserver.UnixStreamServer(path, _NotVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        record = ServerRecord(id="0ddba11", kind="base", identity="x", model_path="/m", served_name="m",
                              host="127.0.0.1", port=None, api_key="k", log_path="/l", supervisor_pid=0,
                              keep_alive=0.0, started_at=time.time(), socket=path)
        manager = Manager(Settings.from_env({}, home=tmp_path, runtime_dir=tmp_path / "run"))
        with pytest.raises(ServerFailed, match="did not list its models .*not .*sage logs 0ddba11"):
            manager._models(record)
    finally:
        server.shutdown()
        server.server_close()
