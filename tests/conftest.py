"""Shared test fixtures: one demo SAGE home and one real vLLM server per test session.

Starting vLLM costs most of a minute, so the unmerged base server with both demo adapters is started once
and shared; tests that need a server of their own (merged, broken, kernel lifetime, concurrency) use their
own runtime folder so that nothing they do can touch the shared one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from sage_magic.core.config import Settings
from sage_magic.core.processes import death_signal
from sage_magic.serving.manager import Manager

# Small, fast servers for tests: float32 like the demo weights, a 64 MB KV cache, no CUDA-graph capture.
TEST_VLLM_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M")
#: The pytest-xdist worker this process is ("gw0", "gw1", ...; empty when the suite runs in one process).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
#: Test servers ask for a port, so every run also exercises the TCP gateway (gateway.py); SAGE_TEST_PORT moves
#: it, so that test runs side by side on one machine do not race for the same port. Each xdist worker gets its
#: own 200 ports (the shared server's, then the team's server and Milvus at +50 and +100).
TEST_PORT = int(os.environ.get("SAGE_TEST_PORT") or 18400) + 200 * int(WORKER[2:] or 0)


def make_settings(home: Path, runtime: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(home=home, runtime_dir=runtime, vllm_args=TEST_VLLM_ARGS, port=TEST_PORT,
                                     ready_timeout=300.0, stop_grace=6.0)
    if os.environ.get(START_LOG):
        values["start_log"] = Path(os.environ[START_LOG])
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


def env_for(settings: Settings) -> dict[str, str]:
    """Environment for a `sage` subprocess or a kernel that must see the same home and registry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_") or k == START_LOG}
    env.update(SAGE_HOME=str(settings.home), SAGE_RUNTIME_DIR=str(settings.runtime_dir),
               SAGE_VLLM_ARGS=" ".join(TEST_VLLM_ARGS), HF_HUB_OFFLINE="1")
    if settings.port is not None:  # else: socket only, as when SAGE_FINETUNE_PORT is unset
        env["SAGE_FINETUNE_PORT"] = str(settings.port)
    if settings.max_loras:  # kernels and `sage` size (and grow) the shared server as the tests' own manager does
        env["SAGE_MAX_LORAS"] = str(settings.max_loras)
    return env


# --- two workers (python -m pytest -n 2): whole files, the slowest first ---------------------------------------
# pyproject's addopts say --dist loadfile (a file's module fixtures, and the servers they start, stay on one
# worker) and --no-loadscope-reorder (xdist would otherwise order files by their number of tests). The files
# below took a minute or more in a serial run (seconds on 2 cores, December 2026: browser 220, serving 170,
# mixed_batch 96, finetune_spread 95, cli 89, remote 73, tracking 71); handed out first, they leave the many
# short files to even out the two workers' ends. A file missing here only runs later.

SLOW_FIRST = ("test_browser.py", "test_serving.py", "test_mixed_batch.py", "test_finetune_spread.py", "test_cli.py",
              "test_remote.py", "test_tracking.py", "test_finetune_options.py", "test_rag_milvus.py",
              "test_panel.py", "test_finetune_control.py", "test_lifetime.py", "test_rag_index.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if WORKER:  # each worker collects, and xdist hands out files in the order they did
        rank = {name: i for i, name in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


# --- the run's server starts, in pytest's terminal summary -------------------------------------------------
# Every supervisor appends its server's start, readiness and exit to SAGE_START_LOG (set here for the whole
# run, inherited by kernels, `sage` subprocesses and Jupyter servers through env_for). Each xdist worker
# writes to a log of its own beside the run's (SAGE_START_LOG.gwN), so that each start is charged to the test
# its own worker was running when it happened (a module fixture's start goes to the module's first test).

START_LOG = "SAGE_START_LOG"
_test_starts: dict[str, list[tuple[float, str]]] = {}  # worker ("" in one process) -> (test's start, test)
_own_log: list[Path] = []  # the log this run made (and removes once reported, with its workers')


def pytest_configure(config: pytest.Config) -> None:
    if WORKER:
        if os.environ.get(START_LOG):
            os.environ[START_LOG] += f".{WORKER}"
    elif not os.environ.get(START_LOG):
        fd, path = tempfile.mkstemp(prefix="sage-starts-", suffix=".jsonl")
        os.close(fd)
        os.environ[START_LOG] = path
        _own_log.append(Path(path))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "setup":  # in one process, or a worker's report as xdist hands it to the controller
        worker = getattr(getattr(report, "node", None), "gateway", None)
        _test_starts.setdefault(worker.id if worker else "", []).append((report.start, report.nodeid))


def _charged_to(worker: str, at: float) -> str:
    running = [nodeid for started, nodeid in _test_starts.get(worker, []) if started <= at]
    return running[-1] if running else "(before the first test)"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _own_log:
        return
    starts: dict[str, dict] = {}
    for path in [_own_log[0], *_own_log[0].parent.glob(f"{_own_log[0].name}.gw*")]:
        worker = path.suffix[1:] if path != _own_log[0] else ""
        text = path.read_text()
        path.unlink()
        for line in text.splitlines():
            event = json.loads(line)
            starts.setdefault(event["id"], {"worker": worker}).update({event["event"]: event})
    if not starts:
        return
    # fault tests that run the real supervisor over a fake "vLLM" show too: they end in well under a second
    terminalreporter.section(f"model server starts: {len(starts)}")
    total = 0.0
    for server_id, events in sorted(starts.items(), key=lambda item: item[1].get("start", {}).get("at", 0.0)):
        start = events.get("start", {})
        if "ready" in events:
            seconds = events["ready"]["seconds"] or 0.0
            how = f"ready in {seconds:6.1f} s"
        elif "exit" in events and events["exit"]["status"] != 0:
            seconds = events["exit"]["after"]
            how = f"failed after {seconds:.1f} s"
        else:  # stopped (or its supervisor killed) before the launcher marked it ready
            seconds = events.get("exit", {}).get("after", 0.0)
            how = f"never ready, gone after {seconds:.1f} s"
        total += seconds
        terminalreporter.write_line(f"{how}  {start.get('served')} ({start.get('kind')}, {server_id})  "
                                    f"{_charged_to(events['worker'], start.get('at', 0.0))}")
    terminalreporter.write_line(f"total time to ready (or to failure): {total:.0f} s")


def sage_processes(runtime: Path, server_id: str | None = None) -> list[psutil.Process]:
    """Supervisors and vLLM processes of one runtime folder (of one server there, given its id), marked by the
    environment the launcher sets."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if ("SAGE_SERVER_ID" in env and env.get("SAGE_RUNTIME_DIR") == str(runtime)
                and server_id in (None, env["SAGE_SERVER_ID"])):
            found.append(proc)
    return found


def marked(server_id: str, command: Sequence[str] = ("sleep", "60")) -> subprocess.Popen:
    """A stand-in for a server's process (its supervisor, say), in a session of its own and carrying the mark
    the launcher puts on them (SAGE_SERVER_ID)."""
    return subprocess.Popen(list(command), start_new_session=True, env={**os.environ, "SAGE_SERVER_ID": server_id})


def wait_until(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SAGE home holding the demo base and fine-tunes, built once (or copied from SAGE_TEST_DEMO_HOME)."""
    home = tmp_path_factory.mktemp("sage_home")
    prebuilt = os.environ.get("SAGE_TEST_DEMO_HOME")
    if prebuilt and (Path(prebuilt) / "finetune_output").is_dir():
        shutil.copytree(prebuilt, home, dirs_exist_ok=True)
    from sage_magic.finetune.demo import build_demo

    build_demo(make_settings(home, home / "unused-run"))
    return home


@pytest.fixture(scope="session")
def settings(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The shared server's registry: SAGE_RUNTIME_DIR when set, so `sage ps` after the run (.ci/run) sees it.
    Its 8 adapter slots hold every fine-tune the suite asks of it (the demo's two, then those trained in the
    tests): sized from the two known at its start, it would grow into a second server midway (one more vLLM
    start, and tests that check a fine-tune joins the running server would depend on the order they run in).
    Growing is test_mixed_batch's story."""
    runtime = os.environ.get("SAGE_RUNTIME_DIR")
    if not runtime:
        return make_settings(demo_home, tmp_path_factory.mktemp("run"), max_loras=8)
    # Each xdist worker has its own demo home, so its own shared server and registry: SAGE_RUNTIME_DIR/gwN.
    return make_settings(demo_home, Path(runtime) / WORKER if WORKER else Path(runtime), max_loras=8)


@pytest.fixture(scope="session")
def manager(settings: Settings):
    """The session's manager. At the end it leaves its servers, and they must really be gone."""
    mgr = Manager(settings)
    yield mgr
    mgr.close()
    assert wait_until(lambda: not mgr.registry.all(), 20), f"servers left running: {mgr.registry.all()}"
    assert wait_until(lambda: not sage_processes(settings.runtime_dir), 20)


@pytest.fixture(scope="session")
def expert(manager: Manager):
    """demo_expert served unmerged: the shared base server with the adapter loaded at runtime."""
    return manager.serve_finetune("demo_expert").endpoint


@pytest.fixture
def short_runtime() -> Iterator[Path]:
    """A runtime folder of its own directly under /tmp: pytest's tmp_path is too long for the Unix sockets a
    server keeps in it (a socket path holds 107 bytes)."""
    runtime = Path(tempfile.mkdtemp(prefix="sage-run-", dir="/tmp"))
    yield runtime
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def fresh_settings(demo_home: Path, short_runtime: Path) -> Settings:
    """Same demo models, but a registry of its own: servers started here are never shared."""
    return make_settings(demo_home, short_runtime)


def new_shell():
    """A fresh, non-singleton IPython shell with the magics loaded and its displays captured."""
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    shell = InteractiveShell(config=Config())
    shell.display_pub = CapturingDisplayPublisher()
    shell.extension_manager.load_extension("sage_magic")
    return shell


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A shell whose sage home is empty and whose registry is its own: nothing here can touch a server."""
    for key, value in env_for(make_settings(tmp_path / "home", tmp_path / "run")).items():
        monkeypatch.setenv(key, value)
    ip = new_shell()
    yield ip
    ip.extension_manager.unload_extension("sage_magic")


@pytest.fixture
def ip(settings: Settings, expert, monkeypatch: pytest.MonkeyPatch):
    """A shell on the session's demo home and registry: its cells reuse the one shared vLLM server."""
    for key, value in env_for(settings).items():
        monkeypatch.setenv(key, value)
    shell = new_shell()
    yield shell
    shell.extension_manager.unload_extension("sage_magic")


# --- the team's server: a vLLM sage_magic did not start ------------------------------------------------------


@dataclass(frozen=True)
class TeamServer:
    """A plain vLLM as a team runs it, started by the suite itself (not through the manager): LoRA on, the
    filesystem resolver reading ``publish_dir``, runtime loading allowed, an API key, a loopback TCP port."""

    base_url: str
    api_key: str
    publish_dir: Path
    model: str  # its --model: what the resolver compares an adapter's base_model_name_or_path with
    process: subprocess.Popen


def start_team_server(model: Path, folder: Path, port: int) -> TeamServer:
    """Start the team's server in its own session (stopped as a group); its IPC files stay in ``folder``. It is
    SIGTERMed if the process that started it dies without its fixture's teardown (a killed test worker)."""
    from sage_magic.core.http import healthy

    publish_dir, private = folder / "published", folder / "tmp"
    publish_dir.mkdir(parents=True, exist_ok=True)
    private.mkdir(exist_ok=True)
    key = secrets.token_urlsafe(16)
    env = {**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(publish_dir),
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1", "TMPDIR": str(private),
           "VLLM_RPC_BASE_PATH": str(private), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--enable-lora",
               "--max-lora-rank", "16", "--api-key", key, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "512", *TEST_VLLM_ARGS]
    with open(folder / "vllm.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=death_signal())
    server = TeamServer(f"http://127.0.0.1:{port}/v1", key, publish_dir, str(model), process)
    started = time.time()
    _note_start("start", served="team server", kind="not ours", at=started)
    if not wait_until(lambda: process.poll() is not None or healthy(server.base_url[:-3]), 300, step=1.0) \
            or process.poll() is not None:
        stop_team_server(server)
        _note_start("exit", after=round(time.time() - started, 2), status=1)
        raise RuntimeError(f"the team's server did not start: {(folder / 'vllm.log').read_text()[-2000:]}")
    _note_start("ready", seconds=round(time.time() - started, 2))
    return server


def _note_start(event: str, **facts: object) -> None:
    """The team's server in the run's start summary, as a supervisor notes ours (SAGE_START_LOG)."""
    if os.environ.get(START_LOG):
        with open(os.environ[START_LOG], "a") as log:
            log.write(json.dumps({"event": event, "id": "team", **facts}) + "\n")


def stop_team_server(server: TeamServer) -> None:
    """SIGTERM the group (vLLM's engine processes outlive a killed API server), SIGKILL what stays."""
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def team_server(demo_home: Path) -> Iterator[TeamServer]:
    """The team's server, shared by every test of a server we do not own (one start per session)."""
    from sage_magic.serving.launch import port_free

    port = next(p for p in range(TEST_PORT + 50, TEST_PORT + 100) if port_free(p))
    folder = Path(tempfile.mkdtemp(prefix="sage-team-", dir="/tmp"))
    server = start_team_server(demo_home / "models" / "sage-demo-base", folder, port)
    yield server
    stop_team_server(server)
    shutil.rmtree(folder, ignore_errors=True)
    assert wait_until(lambda: not _team_processes(server), 20), "the team's server outlived the tests"


def _team_processes(server: TeamServer) -> list[psutil.Process]:
    """The team's server's processes (its engine's too), found by the publish folder in their environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("VLLM_LORA_RESOLVER_CACHE_DIR") == str(server.publish_dir):
                found.append(proc)
        except psutil.Error:
            continue
    return found


# --- a Milvus server: Milvus Lite's own gRPC server, as `milvus-lite server` runs it on a laptop --------------


def start_milvus_lite(folder: Path) -> tuple[subprocess.Popen, str]:
    """`milvus-lite server` on a free loopback port with its data in ``folder`` (its own process group), as a
    laptop runs it; returns the process and its ``milvus://127.0.0.1:PORT``. Used by the tests and milvus_bench.
    Like the team's server, it goes when the process that started it dies."""
    from sage_magic.serving.launch import port_free

    port = next(p for p in range(TEST_PORT + 100, TEST_PORT + 150) if port_free(p))
    command = [os.path.join(os.path.dirname(sys.executable), "milvus-lite"), "server", "--data-dir",
               str(folder / "data"), "--host", "127.0.0.1", "--port", str(port)]
    with open(folder / "server.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=death_signal())
    if not wait_until(lambda: process.poll() is not None or not port_free(port), 60) or process.poll() is not None:
        stop_milvus_lite(process)
        raise RuntimeError(f"milvus-lite server did not start: {(folder / 'server.log').read_text()[-2000:]}")
    return process, f"milvus://127.0.0.1:{port}"


def stop_milvus_lite(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``milvus://127.0.0.1:PORT`` of a real Milvus Lite server started for the session (the `milvus` extra);
    stopped at the end of the session."""
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "milvus-lite")):
        pytest.skip("milvus-lite is not installed (pip install 'sage-magic[milvus]')")
    process, uri = start_milvus_lite(tmp_path_factory.mktemp("milvus"))
    yield uri
    stop_milvus_lite(process)
