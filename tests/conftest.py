"""Shared test fixtures: one demo SAGE home and one real vLLM server per test session.

Starting vLLM costs most of a minute, so the unmerged base server with both demo adapters is started once
and shared; tests that need a server of their own (merged, broken, kernel lifetime, concurrency) use their
own runtime folder so that nothing they do can touch the shared one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sage_magic.core.config import Settings
from sage_magic.serving.manager import Manager

# Small, fast servers for tests: float32 like the demo weights, a 64 MB KV cache, no CUDA-graph capture.
TEST_VLLM_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M")
#: Test servers ask for a port, so every run also exercises the TCP gateway (gateway.py); SAGE_TEST_PORT moves
#: it, so that test runs side by side on one machine do not race for the same port.
TEST_PORT = int(os.environ.get("SAGE_TEST_PORT") or 18400)


def make_settings(home: Path, runtime: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(home=home, runtime_dir=runtime, vllm_args=TEST_VLLM_ARGS, port=TEST_PORT,
                                     ready_timeout=300.0, stop_grace=6.0)
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


def env_for(settings: Settings) -> dict[str, str]:
    """Environment for a `sage` subprocess or a kernel that must see the same home and registry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env.update(SAGE_HOME=str(settings.home), SAGE_RUNTIME_DIR=str(settings.runtime_dir),
               SAGE_VLLM_ARGS=" ".join(TEST_VLLM_ARGS), HF_HUB_OFFLINE="1")
    if settings.port is not None:  # else: socket only, as when SAGE_FINETUNE_PORT is unset
        env["SAGE_FINETUNE_PORT"] = str(settings.port)
    return env


def sage_processes(runtime: Path) -> list[psutil.Process]:
    """Supervisors and vLLM processes of one runtime folder, marked by the environment the launcher sets."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if "SAGE_SERVER_ID" in env and env.get("SAGE_RUNTIME_DIR") == str(runtime):
            found.append(proc)
    return found


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
    """The shared server's registry: SAGE_RUNTIME_DIR when set, so `sage ps` after the run (.ci/run) sees it."""
    runtime = os.environ.get("SAGE_RUNTIME_DIR")
    return make_settings(demo_home, Path(runtime) if runtime else tmp_path_factory.mktemp("run"))


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
