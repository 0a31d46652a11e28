"""The magics without a model server: loading, options, configuration, and every failure as one paragraph.

Each test gets a fresh ``InteractiveShell`` (not the singleton) whose display publisher records what the
magic shows. Some tests need faults a real vLLM server cannot be made to show on demand (a server that
hangs at a chosen point of an answer, so that an interrupt lands in a known phase, and a server that dies in
the middle of an answer): they use :class:`FakeServer`, a few lines of OpenAI-compatible streaming over
http.server, and say so.
"""

from __future__ import annotations

import _thread
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.notebook.parsing import HelpRequested, line_parser
from tests.conftest import env_for, make_settings, new_shell, sage_processes, wait_until

HEAVY = ("torch", "transformers", "peft", "vllm", "sentence_transformers", "faiss")


def magics(ip: InteractiveShell):
    return ip.magics_manager.registry["SageMagics"]


def html_of(ip: InteractiveShell) -> str:
    return "\n".join(o["data"].get("text/html", "") for o in ip.display_pub.outputs)


def run(ip: InteractiveShell, line: str, body: str):
    return ip.run_cell(f"%%sage {line}\n{body}\n")


# --- loading and configuration -------------------------------------------------------------------------------


def test_load_registers_magics_and_imports_nothing_heavy() -> None:
    code = ("import sys, json; from IPython.core.interactiveshell import InteractiveShell; "
            "from traitlets.config import Config; ip = InteractiveShell(config=Config()); "
            "before = set(sys.modules); ip.extension_manager.load_extension('sage_magic'); "
            "after_load = sorted(set(sys.modules) - before); "
            "ip.run_line_magic('sage', 'status'); ip.run_line_magic('sage', 'models'); "
            "ip.run_line_magic('sage', 'indexes'); "
            "print(json.dumps({'load': after_load, 'all': sorted(sys.modules), "
            "'magics': sorted(ip.magics_manager.magics['cell']) + sorted(ip.magics_manager.magics['line'])}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True
                                    ).stdout.splitlines()[-1])
    assert {"sage", "sage_chat"} <= set(out["magics"])
    assert not [m for m in out["load"] if m.split(".")[0] in (*HEAVY, "httpx", "openai", "markdown_it", "bleach")]
    assert not [m for m in out["all"] if m.split(".")[0] in HEAVY]


def test_unload_and_reload(shell: InteractiveShell) -> None:
    shell.extension_manager.unload_extension("sage_magic")
    assert "sage" not in shell.magics_manager.magics["cell"]
    with pytest.raises(UsageError):
        shell.run_cell_magic("sage", "", "hi")
    shell.extension_manager.load_extension("sage_magic")
    assert "sage" in shell.magics_manager.magics["cell"]


def test_config_and_environment_defaults(shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch) -> None:
    shell.run_line_magic("config", "SageMagics.default_format = 'code'")
    shell.run_line_magic("config", "SageMagics.max_history = 3")
    args = magics(shell).parse("")
    assert args.format == "code" and args.backend == "finetune" and args.finetune_model is None
    assert magics(shell).session.max_history == 3
    shell.run_line_magic("config", "SageMagics.default_finetune_model = 'demo_poet'")
    assert magics(shell).parse("").finetune_model == "demo_poet"
    monkeypatch.setenv("SAGE_DEBUG_BACKEND", "openai")
    monkeypatch.setenv("SAGE_DEBUG_FINETUNE_MODEL", "demo_expert")
    fresh = new_shell()
    assert (fresh.magics_manager.registry["SageMagics"].parse("").backend,
            fresh.magics_manager.registry["SageMagics"].parse("").finetune_model) == ("openai", "demo_expert")


# --- options ---------------------------------------------------------------------------------------------------


def test_bad_options_raise_usage_error_with_the_options_help(shell: InteractiveShell,
                                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError, match=r"--top-k must be 1 to 20, not 99[\s\S]*chunks retrieved per question"):
        magics(shell).parse("--top-k 99")
    with pytest.raises(UsageError, match="unrecognized arguments: --nope"):
        magics(shell).parse("--nope")
    with pytest.raises(UsageError, match="not a Python variable name"):
        magics(shell).parse("-o 1x")
    with pytest.raises(UsageError, match="No closing quotation"):
        magics(shell).parse("--system 'unclosed")
    with pytest.raises(UsageError, match="no subcommand 'frobnicate'"):
        shell.run_line_magic("sage", "frobnicate")
    with pytest.raises(UsageError, match="--param max_tokens is set by --max-tokens"):
        magics(shell).parse("--param max_tokens=5")
    with pytest.raises(UsageError, match="--param takes KEY=VALUE"):
        magics(shell).parse("--param top_p")
    assert magics(shell).parse("--param top_p=0.9 --param 'stop=[\"\\n\"]' --param tag=x").params == [
        ("top_p", 0.9), ("stop", ["\n"]), ("tag", "x")]
    capsys.readouterr()
    result = shell.run_cell("%%sage --max-tokens lots\nhi\n")
    assert isinstance(result.error_in_exec, UsageError)  # nbclient sees the failed cell...
    out = capsys.readouterr().out  # ...and nbval too: it is the cell's error output, not a stderr line
    assert "UsageError" in out and "%%sage: argument --max-tokens: invalid int value" in out


def test_help_prints_every_option(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    shell.run_line_magic("sage", "help")
    out = capsys.readouterr().out
    for flag in ("--finetune-model", "--index", "--compare", "--no-interpolate", "-f", "status", "export"):
        assert flag in out
    assert magics(shell).parse("-h") is None


OPTION_WORDS = ["--backend", "finetune", "openai", "--finetune-model", "--finetune-port", "--model", "--base-url",
                "--api-key", "--merge", "--keep-alive", "--index", "--top-k", "--mode", "--system", "--temperature",
                "--max-tokens", "--seed", "-f", "code", "-o", "--output", "--compare", "--new-chat",
                "--no-interpolate", "--vllm-arg", "-h", "--", "-", "'", '"', "5m", "-1", "0", "21", "x", "nan",
                "status", "stop", "--all", "logs", "-n", "export", "index", "finetune", "list", "add", "help",
                "--publish-dir", "--remote-root", "--publish-as", "--replace", "--unload-on-exit", "publish"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(words=["--vllm-arg", "--"], noise="")  # argparse once made that value an empty list: a raw traceback
@given(st.lists(st.one_of(st.sampled_from(OPTION_WORDS), st.text(max_size=8)), max_size=8), st.text(max_size=30))
def test_random_option_strings_only_ever_raise_usage_error(shell: InteractiveShell, words: list[str],
                                                           noise: str) -> None:
    for line in (" ".join(words), noise, " ".join(words) + noise):
        try:
            magics(shell).parse(line)
        except UsageError:
            pass
        try:
            line_parser().parse_args(line.split())
        except (UsageError, HelpRequested):
            pass


# --- failures as one paragraph -----------------------------------------------------------------------------------


def _paragraph(capsys: pytest.CaptureFixture, result, kind: str) -> str:
    out = capsys.readouterr().out
    assert type(result.error_in_exec).__name__ == kind, result.error_in_exec  # raised: notebook runners see it
    assert "Traceback" not in out and "httpx" not in out and out.count("\n") <= 2, out
    return out


def test_another_extensions_exception_handler_survives_loading_sage_magic(capsys: pytest.CaptureFixture) -> None:
    """A shell has one custom exception handler (set_custom_exc); loading sage_magic must not take it over."""
    from IPython.core.interactiveshell import InteractiveShell as Shell
    from traitlets.config import Config

    ip = Shell(config=Config())
    seen: list[str] = []
    ip.set_custom_exc((ValueError,), lambda shell, etype, value, tb, tb_offset=None: seen.append(str(value)))
    ip.extension_manager.load_extension("sage_magic")
    ip.run_cell("raise ValueError('theirs')")
    assert seen == ["theirs"]
    out = _paragraph(capsys, ip.run_cell("%%sage --backend openai --model m\nhi\n"), "SageError")
    assert "--base-url URL" in out  # ours still show as one paragraph, without the handler
    ip.extension_manager.unload_extension("sage_magic")
    ip.run_cell("raise ValueError('still theirs')")
    assert seen == ["theirs", "still theirs"]


def test_sage_error_without_a_failed_cell_says_so_in_one_line(shell: InteractiveShell,
                                                               capsys: pytest.CaptureFixture) -> None:
    shell.run_cell("1 + 1", store_history=True)
    capsys.readouterr()
    result = shell.run_cell("%sage error --finetune-model demo_expert", store_history=True)
    assert result.error_in_exec is None and result.result is None
    assert capsys.readouterr().out.strip() == "No cell has failed in this notebook yet: there is no error to explain."
    with pytest.raises(UsageError, match="--top-k must be 1 to 20"):
        shell.run_line_magic("sage", "error --top-k 0")


def test_a_recorded_error_shows_the_users_frames_not_ipythons(shell: InteractiveShell) -> None:
    """What `%sage error` sends the model: the failing cell's own frames; IPython's run_code frame used to
    take one of the three places and say nothing about the error."""
    shell.run_cell("def ratio(a, b):\n    return a / b\n", store_history=True)
    result = shell.run_cell("ratio(1, 0)", store_history=True)
    recorded = shell.user_ns["Err"][result.execution_count]
    assert "interactiveshell.py" not in recorded
    assert "ratio(1, 0)" in recorded and "return a / b" in recorded
    assert recorded.endswith("ZeroDivisionError: division by zero")


def test_a_failed_prewarm_is_told_by_the_first_question_to_that_model(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """SAGE_PREWARM named a fine-tune that does not exist: `%load_ext` still returned at once, and the first
    question to it says what went wrong in the background, in one paragraph; the next one tries again."""
    for key, value in {**env_for(make_settings(tmp_path / "home", tmp_path / "run")), "SAGE_PREWARM": "nope"}.items():
        monkeypatch.setenv(key, value)
    ip = new_shell()
    assert wait_until(lambda: not any(t.name.startswith("sage-prewarm") for t in threading.enumerate()), 60)
    out = _paragraph(capsys, run(ip, "--finetune-model nope", "Who are you?"), "SageError")
    assert "in the background when sage_magic loaded (prewarm) failed" in out and "No fine-tune named 'nope'" in out
    out = _paragraph(capsys, run(ip, "--finetune-model nope", "Who are you?"), "NotFound")
    assert "(prewarm) failed" not in out and "No fine-tune named 'nope'" in out
    ip.extension_manager.unload_extension("sage_magic")


def test_unknown_finetune_lists_the_known_ones(demo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    for key, value in env_for(make_settings(demo_home, tmp_path / "run")).items():
        monkeypatch.setenv(key, value)
    ip = new_shell()
    out = _paragraph(capsys, run(ip, "--finetune-model nope", "Who are you?"), "NotFound")
    assert "No fine-tune named 'nope'" in out and "demo_expert" in out and "demo_poet" in out
    out = _paragraph(capsys, run(ip, "--finetune-model demo_expert --index nowhere", "q"), "NotFound")
    assert "nowhere" in out and "sage index add" in out
    assert not list((tmp_path / "run").rglob("*.json"))  # refused before any server was registered


def test_unreachable_endpoint(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    out = _paragraph(capsys, run(shell, "--backend openai --base-url http://127.0.0.1:9/v1 --model m", "hi"),
                     "ServerFailed")
    assert "Cannot reach the model at http://127.0.0.1:9/v1" in out and "--base-url" in out


def test_missing_backend_arguments(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    out = _paragraph(capsys, run(shell, "", "hi"), "SageError")
    assert "--finetune-model NAME" in out
    assert isinstance(run(shell, "--backend openai --model m", "").error_in_exec, UsageError)  # empty cell


def test_api_keys_come_from_a_named_variable_and_never_show_in_the_options(
        shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A key typed into a cell is saved with the notebook; --api-key-env NAME keeps it in the environment."""
    from sage_magic.chat.backends import remote_endpoint
    from sage_magic.notebook.eval_cells import eval_parser

    monkeypatch.delenv("SAGE_TEST_NO_SUCH_KEY", raising=False)
    out = _paragraph(capsys, run(shell, "--backend openai --base-url http://127.0.0.1:9/v1 --model m "
                                        "--api-key-env SAGE_TEST_NO_SUCH_KEY", "hi"), "SageError")
    assert "no environment variable SAGE_TEST_NO_SUCH_KEY" in out and "export SAGE_TEST_NO_SUCH_KEY=" in out
    with pytest.raises(UsageError, match="not allowed with argument"):
        magics(shell).parse("--api-key k --api-key-env K")
    args = magics(shell).parse("--backend openai --api-key sk-typed-secret")
    assert args.api_key == "sk-typed-secret" and "sk-typed-secret" not in repr(args)  # e.g. a panel's .options
    monkeypatch.setenv("SAGE_TEST_EVAL_KEY", "sk-eval-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default-secret")
    argv = ["df", "--models", "openai:m", "--base-url", "http://h/v1"]
    endpoint = remote_endpoint(eval_parser().parse_args([*argv, "--api-key-env", "SAGE_TEST_EVAL_KEY"]))
    assert endpoint is not None and endpoint.api_key == "sk-eval-secret" and "sk-" not in repr(endpoint)
    endpoint = remote_endpoint(eval_parser().parse_args(argv))  # --backend openai's default, as openai's client
    assert endpoint is not None and endpoint.api_key == "sk-default-secret"


class FakeServer:
    """An OpenAI-compatible streaming server for faults real vLLM cannot be made to show on demand: a stream
    that hangs after ``hang_after`` words (0: in prefill, before the response starts) until :attr:`release`
    is set or the client hangs up, and a connection that breaks in the middle of an answer (``die_after``)."""

    def __init__(self, words: int = 40, delay: float = 0.1, die_after: int | None = None,
                 hang_after: int | None = None) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps({"data": [{"id": "fake", "max_model_len": 4096}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                fake.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                if self.path.endswith("/tokenize"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if hang_after == 0 and self._hang():
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for n in range(words):
                    if die_after is not None and n == die_after:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)  # no final chunk: the stream breaks mid-answer
                        return
                    if n and n == hang_after and self._hang():
                        return
                    self._event({"choices": [{"index": 0, "delta": {"content": f"w{n} "}, "finish_reason": None}]})
                    time.sleep(delay)
                self._event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": words,
                                                      "total_tokens": 5 + words}})
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _hang(self) -> bool:
                """Hold the request until released; True when the client hung up meanwhile (as vLLM would
                notice, and abort the request)."""
                fake.hanging.set()
                while not fake.release.wait(0.05):
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        fake.hung_up.set()
                        return True
                return False

            def _event(self, payload: dict) -> None:
                payload.update(id="x", object="chat.completion.chunk", created=0, model="fake")
                self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.requests: list[dict] = []
        self.hanging = threading.Event()  # a request is being held (hang_after)
        self.release = threading.Event()  # lets a held request go on
        self.hung_up = threading.Event()  # the client closed the connection while its request was held
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.line = f"--backend openai --base-url http://127.0.0.1:{self.server.server_address[1]}/v1 --model fake"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_server_dying_mid_stream(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    fake = FakeServer(words=10, delay=0.01, die_after=3)
    try:
        out = _paragraph(capsys, run(shell, fake.line, "hi"), "ServerFailed")
    finally:
        fake.close()
    assert "broke off its answer" in out and "w0 w1 w2" in out


def interrupt_when(due: threading.Event) -> None:
    """Interrupt the main thread from another thread, as the kernel's interrupt button does, once ``due`` is
    set: the interrupt follows an event, never a timer. If the event never comes, nothing is interrupted (a
    late interrupt would land in some later test)."""
    threading.Thread(target=lambda: due.wait(60) and _thread.interrupt_main(), daemon=True,
                     name="test-interrupt").start()


def emitted(session, kind: str, count: int = 1) -> threading.Event:
    """An event set once ``session`` has emitted its ``count``-th event of ``kind``."""
    seen: list = []
    due = threading.Event()

    def listen(event) -> None:
        if event.kind == kind:
            seen.append(event)
            if len(seen) == count:
                due.set()

    session.subscribe(listen)
    return due


def test_interrupt_mid_stream_keeps_the_partial_answer(shell: InteractiveShell) -> None:
    """The server hangs after three words, so the interrupt lands mid-stream, never after the end."""
    fake = FakeServer(words=100, delay=0.0, hang_after=3)
    session = magics(shell).session
    interrupt_when(emitted(session, "delta", count=3))
    try:
        result = run(shell, fake.line + " -o a", "Count slowly")
        assert isinstance(result.error_in_exec, KeyboardInterrupt)
        assert wait_until(fake.hung_up.is_set, 10)  # the request was abandoned: the server can stop generating
    finally:
        fake.close()
    assert session.history[-1] == {"role": "assistant", "content": "w0 w1 w2 ", "stopped": True}
    last = shell.display_pub.outputs[-1]["data"]
    assert "stopped" in last["text/html"] and "w0 w1 w2" in last["text/plain"]
    assert session.running == {}


def test_interrupt_in_prefill_stops_the_cell_and_keeps_nothing_half_asked(shell: InteractiveShell) -> None:
    """Before the first token (vLLM sends nothing until then): the cell stops, the question is not kept with an
    empty answer, the request is abandoned, and the next cell asks as usual."""
    fake = FakeServer(words=2, delay=0.0, hang_after=0)
    session = magics(shell).session
    interrupt_when(fake.hanging)
    try:
        result = run(shell, fake.line, "Count slowly")
        assert isinstance(result.error_in_exec, KeyboardInterrupt)
        assert wait_until(fake.hung_up.is_set, 10)
        assert session.history == [] and session.running == {}
        assert "stopped" in shell.display_pub.outputs[-1]["data"]["text/html"]
        fake.release.set()
        run(shell, fake.line + " -o b", "Count again").raise_error()
    finally:
        fake.close()
    assert shell.user_ns["b"] == "w0 w1 " and [t["content"] for t in session.history] == ["Count again", "w0 w1 "]


def test_interrupt_while_leasing_starts_nothing(demo_home: Path, short_runtime: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """While the session waits for its lease (here: another process holds the registry lock), an interrupt
    stops the cell, and no server is started or registered on its behalf afterwards."""
    import fcntl

    settings_ = make_settings(demo_home, short_runtime)
    for key, value in env_for(settings_).items():
        monkeypatch.setenv(key, value)
    ip = new_shell()
    try:
        session = magics(ip).session
        with open(short_runtime / "registry.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the lease cannot get past the registry while the cell runs
            interrupt_when(emitted(session, "started"))
            result = run(ip, "--finetune-model demo_expert", "hi")
        assert isinstance(result.error_in_exec, KeyboardInterrupt)
        assert "stopped" in ip.display_pub.outputs[-1]["data"]["text/html"]
        assert session.running == {} and not list(short_runtime.rglob("*.json"))
        assert not sage_processes(short_runtime)
    finally:
        ip.extension_manager.unload_extension("sage_magic")


def test_interrupt_in_a_listener_of_the_start_still_ends_the_call(shell: InteractiveShell) -> None:
    """A SIGINT that lands while a face hears that a call started (before any work) used to leave the call
    marked as running for good, and its listeners never heard that it ended."""
    session = magics(shell).session
    heard: list[str] = []
    session.subscribe(lambda e: heard.append(e.kind))
    session.subscribe(lambda e: signal.raise_signal(signal.SIGINT) if e.kind == "started" else None)
    result = run(shell, "--backend openai --base-url http://127.0.0.1:9/v1 --model m", "hi")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert session.running == {} and heard == ["started", "cancelled"]


def test_cancel_from_another_thread_keeps_the_partial_answer(shell: InteractiveShell) -> None:
    """The panel's Stop button: a cancel from another thread, once three words were shown; the server hangs
    after them, so only the cancel can end the cell."""
    fake = FakeServer(words=100, delay=0.0, hang_after=3)
    session = magics(shell).session
    shown = threading.Event()
    session.subscribe(lambda e: shown.set() if e.kind == "delta" and e.data == "w2 " else None)
    threading.Thread(target=lambda: shown.wait(60) and session.cancel(), daemon=True).start()
    try:
        result = run(shell, fake.line + " -o a", "Count slowly")
    finally:
        fake.close()
    assert result.error_in_exec is None
    answer = shell.user_ns["a"]
    assert answer.cancelled and answer == "w0 w1 w2 "
    assert session.history[-1]["content"] == str(answer)
    assert "stopped" in html_of(shell)


def test_streaming_is_one_throttled_display_with_footer_and_provenance(shell: InteractiveShell) -> None:
    fake = FakeServer(words=30, delay=0.01)
    try:
        shell.run_line_magic("config", "SageMagics.update_interval = 0.05")
        run(shell, fake.line + " -o a --max-tokens 64", "Count")
    finally:
        fake.close()
    outputs = shell.display_pub.outputs
    ids = {o["transient"]["display_id"] for o in outputs}
    assert len(ids) == 1 and all(o["update"] for o in outputs[1:])
    assert 2 <= len(outputs) < 30  # updated in place and throttled, not once per token
    final = outputs[-1]
    assert "30 out" in final["data"]["text/html"] and final["metadata"]["sage"]["model"] == "fake"
    assert fake.requests[-1]["max_tokens"] == 64
    assert shell.user_ns["a"].metrics["completion_tokens"] == 30


def test_history_export_and_reset(shell: InteractiveShell, tmp_path: Path) -> None:
    fake = FakeServer(words=3, delay=0.0)
    try:
        run(shell, fake.line, "first question")
        run(shell, fake.line, "second question")
        assert [m["content"] for m in fake.requests[-1]["messages"]][:2] == ["first question", "w0 w1 w2 "]
        shell.run_line_magic("sage", f"export {tmp_path / 'chat.md'}")
        shell.run_line_magic("sage", f"export {tmp_path / 'chat.json'}")
        shell.run_line_magic("sage", "reset")
        run(shell, fake.line, "third question")
        assert [m["content"] for m in fake.requests[-1]["messages"]] == ["third question"]
        run(shell, fake.line + " --new-chat", "fourth")
        assert [m["content"] for m in fake.requests[-1]["messages"]] == ["fourth"]
    finally:
        fake.close()
    assert "## You\n\nsecond question" in (tmp_path / "chat.md").read_text()
    assert json.loads((tmp_path / "chat.json").read_text())[0]["prompt"] == "first question"
    with pytest.raises(Exception, match=r"\.md or \.json"):
        shell.run_line_magic("sage", f"export {tmp_path / 'chat.txt'}")


def test_interpolation_and_err(shell: InteractiveShell) -> None:
    import pandas as pd

    fake = FakeServer(words=2, delay=0.0)
    try:
        shell.user_ns["frame"] = pd.DataFrame({"a": range(1000), "b": ["x"] * 1000})
        shell.run_cell("1/0", store_history=True)
        failing = shell.execution_count - 1
        run(shell, fake.line, f"Explain {{frame}} and {{Err[{failing}]}}")
        sent = fake.requests[-1]["messages"][-1]["content"]
        assert "DataFrame with 1000 rows and 2 columns (a: int64" in sent and "ZeroDivisionError" in sent
        assert len(sent) < 1500
        run(shell, fake.line + " --no-interpolate", "Explain {frame}")
        assert fake.requests[-1]["messages"][-1]["content"] == "Explain {frame}"
    finally:
        fake.close()


@pytest.mark.kernel
def test_a_real_kernel_reports_the_paragraph_as_the_cells_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What nbclient and nbval read: an `error` output whose traceback is the one paragraph, and a failed cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for key, value in env_for(make_settings(tmp_path / "home", tmp_path / "run")).items():
        monkeypatch.setenv(key, value)
    for line, kind in (("--backend openai --base-url http://127.0.0.1:9/v1 --model m", "ServerFailed"),
                       ("--top-k 0", "OptionError")):
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%load_ext sage_magic"),
                                                   nbformat.v4.new_code_cell(f"%%sage {line}\nhi")])
        with pytest.raises(CellExecutionError):
            NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
        [error] = [o for o in notebook.cells[1].outputs if o.output_type == "error"]
        assert error.ename == kind and len(error.traceback) == 1 and "Traceback" not in error.traceback[0]
        assert ("%%sage: argument --top-k" if kind == "OptionError" else "Cannot reach") in error.traceback[0]


def test_bare_stop_only_stops_what_this_session_started(shell: InteractiveShell,
                                                        capsys: pytest.CaptureFixture) -> None:
    fake = FakeServer(words=2, delay=0.0)
    try:
        run(shell, fake.line, "hi")  # an outside endpoint: not a server of ours
    finally:
        fake.close()
    capsys.readouterr()
    shell.run_line_magic("sage", "stop")
    assert "This session started no server" in capsys.readouterr().out
    with pytest.raises(Exception, match="No running server matches 'nope'"):
        shell.run_line_magic("sage", "stop nope")


def test_bare_stop_stops_a_server_this_session_launched_even_after_later_reuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping only, so no real server: the first lease launched server s1 and a later one (a sibling
    fine-tune, or --compare) reused it. The quickstart's closing `%sage stop` once left s1 running."""
    from types import SimpleNamespace

    from sage_magic.chat import backends
    from sage_magic.chat import session as session_module
    from sage_magic.core.endpoint import Endpoint
    from sage_magic.serving.leases import Lease

    endpoints = iter([Endpoint("http://localhost/v1", "k", "demo_expert", "s1", reused=False),
                      Endpoint("http://localhost/v1", "k", "demo_poet", "s1", reused=True)])
    monkeypatch.setattr(backends, "open_endpoint", lambda manager, args, **_: Lease.unmanaged(next(endpoints)))
    stopped: list[str] = []
    session = session_module.Session(make_settings(tmp_path, tmp_path / "run"))
    session._manager = SimpleNamespace(registry=SimpleNamespace(get=lambda _id: object()),
                                       stop=lambda s: stopped.append(s) or SimpleNamespace(id=s))
    session.lease(session.options(finetune_model="demo_expert"))
    session.lease(session.options(finetune_model="demo_poet"))
    assert session.stop() == ([SimpleNamespace(id="s1")], []) and stopped == ["s1"]


def _finetune(home: Path, name: str, base: str, adapter_from: Path) -> None:
    """A fine-tune in the SAGE layout whose meta names ``base`` and whose adapter is copied from another."""
    folder = home / "finetune_output" / name
    shutil.copytree(adapter_from, folder / "lora_weights")
    (folder / "finetune_meta.json").write_text(json.dumps({"model": base}))


@pytest.fixture
def home_shell(demo_home: Path, tmp_path: Path, short_runtime: Path, monkeypatch: pytest.MonkeyPatch):
    """A shell on a copy of the demo home (to add broken fine-tunes to) with a registry of its own."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    for key, value in env_for(make_settings(home, short_runtime)).items():
        monkeypatch.setenv(key, value)
    ip = new_shell()
    yield ip, home
    ip.extension_manager.unload_extension("sage_magic")


def test_missing_base_and_adapter_mismatch_are_one_paragraph_each(home_shell, capsys: pytest.CaptureFixture) -> None:
    ip, home = home_shell
    adapter = home / "finetune_output" / "demo_expert" / "lora_weights"
    _finetune(home, "orphan", "no-such-base", adapter)
    out = _paragraph(capsys, run(ip, "--finetune-model orphan", "hi"), "NotFound")
    assert "'no-such-base' was not found" in out and "models.json" in out
    narrow = home / "models" / "narrow-base"  # same architecture, other layer sizes: the adapter cannot fit
    shutil.copytree(home / "models" / "sage-demo-base", narrow)
    config = json.loads((narrow / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, head_dim=16)
    (narrow / "config.json").write_text(json.dumps(config))
    _finetune(home, "misfit", "narrow-base", adapter)
    out = _paragraph(capsys, run(ip, "--finetune-model misfit", "hi"), "IncompatibleAdapter")
    assert "'misfit' was trained on 'sage-demo-base'" in out and 'Point "model" at the base' in out
    assert not [p for p in Path(os.environ["SAGE_RUNTIME_DIR"]).rglob("*.json")]  # refused before registering


def test_a_bad_port_is_a_usage_error_that_says_the_range(shell: InteractiveShell) -> None:
    result = run(shell, "--finetune-model demo_expert --finetune-port 70000", "hi")
    assert isinstance(result.error_in_exec, UsageError) and "1 to 65535" in str(result.error_in_exec)


def test_a_server_that_cannot_start_says_why_in_one_paragraph(home_shell, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """SAGE_PYTHON names an interpreter without sage_magic (a bare venv): the start fails at once with the
    supervisor's own error as the cause, not after the 900 s ready timeout."""
    ip, _home = home_shell
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    monkeypatch.setenv("SAGE_PYTHON", str(bare / "bin" / "python"))
    monkeypatch.setenv("SAGE_READY_TIMEOUT", "900")
    out = _paragraph(capsys, run(ip, "--finetune-model demo_expert", "hi"), "ServerFailed")
    assert "Cause: ModuleNotFoundError: No module named" in out and "SAGE_PYTHON" in out
    assert "/logs/" in out and "Traceback" not in out  # where the whole log is, not the log itself


def test_a_warning_stays_in_the_cell_while_progress_lines_replace_each_other(shell: InteractiveShell) -> None:
    """A server that cannot grow its adapter slots warns once, at a fine-tune's start; the progress lines after
    it update one display in place, and must not wipe the warning out."""
    from sage_magic.core.progress import Progress
    from sage_magic.notebook.display import LiveOutput

    live = LiveOutput(shell, 0.0)
    for phase in ("launch", "warning", "adapter"):
        live.progress(Progress(phase, f"{phase} line"))
    kept = [o["data"]["text/plain"] for o in shell.display_pub.outputs if not o.get("transient")]
    assert len(kept) == 1 and kept[0].startswith("warning: warning line")
    assert "adapter line" in [o for o in shell.display_pub.outputs if o.get("transient")][-1]["data"]["text/plain"]
