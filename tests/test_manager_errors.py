"""What the manager does when a start cannot work or is called off, without a real vLLM server.

A real vLLM cannot show a supervisor that dies at start-up or a server that hangs before it is ready, so
these tests point the serving interpreter at a bare venv (no psutil: the supervisor dies at import) or at a
wrapper whose "vLLM" is a ``sleep`` (a hang); both are real processes under the real supervisor.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sage_magic.core.config import Settings
from sage_magic.core.errors import Cancelled, SageError, ServerFailed
from sage_magic.core.files import exclusive
from sage_magic.core.progress import Progress
from sage_magic.finetune.demo import DEMO_BASE
from sage_magic.serving.manager import Manager, shared
from tests.conftest import make_settings, marked, sage_processes, wait_until


def test_no_vllm_in_the_serving_interpreter_says_how_to_install(
        short_runtime: Path, demo_home: Path, tmp_path: Path, monkeypatch) -> None:
    from sage_magic.core import vllm_env

    monkeypatch.setattr(vllm_env, "installed_vllm", lambda: None)
    manager = Manager(make_settings(demo_home, short_runtime))
    with pytest.raises(SageError) as error:
        manager.serve_finetune("demo_expert")
    assert "install-cpu.sh" in str(error.value) and "--backend openai" in str(error.value)
    assert manager.registry.all() == []


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An interpreter without sage_magic's dependencies: a plain venv, no pip, no site packages."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return str(folder / "bin" / "python")


@pytest.fixture
def hanging_python(tmp_path: Path) -> str:
    """An interpreter that runs the real supervisor, but whose "vLLM" never becomes ready (it sleeps)."""
    wrapper = tmp_path / "python-hang"
    wrapper.write_text(f'#!/bin/sh\nif [ "$2" = "sage_magic.serving.supervisor" ]; then\n'
                       f'  exec {sys.executable} "$@"\nfi\nexec sleep 300\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _in_thread(call) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_supervisor_that_cannot_start_fails_at_once_with_its_error(
        short_runtime: Path, demo_home: Path, tmp_path: Path,
                                                                     bare_python: str) -> None:
    """It used to wait for the full ready timeout (900 s here) and then say "still running, pid None"."""
    settings = make_settings(demo_home, short_runtime, ready_timeout=900.0, python=bare_python)
    manager = Manager(settings)
    with pytest.raises(ServerFailed) as error:
        manager.serve_finetune("demo_expert")
    message = str(error.value)
    assert "ModuleNotFoundError" in message  # the supervisor's own stderr
    assert "SAGE_PYTHON" in message and "did not answer" not in message and "pid None" not in message
    manager.close()
    assert wait_until(lambda: not sage_processes(settings.runtime_dir), 10)


def test_a_progress_callback_may_ask_the_manager_what_runs(short_runtime: Path, demo_home: Path, tmp_path: Path,
                                                           bare_python: str) -> None:
    """A face refreshing its server list from its progress callback deadlocked: callbacks ran under the lock."""
    manager = Manager(make_settings(demo_home, short_runtime, python=bare_python))
    phases: list[str] = []

    def progress(event: Progress) -> None:
        manager.servers()
        phases.append(event.phase)

    thread, errors = _in_thread(lambda: manager.serve_finetune("demo_expert", progress=progress))
    thread.join(120)
    assert not thread.is_alive(), f"deadlocked after {phases}"
    assert "launch" in phases and errors and isinstance(errors[0], SageError)
    manager.close()


def test_shared_is_one_manager_and_each_call_brings_its_own_settings_and_progress(short_runtime: Path,
        demo_home: Path, tmp_path: Path, bare_python: str) -> None:
    settings = make_settings(demo_home, short_runtime)
    barrier = threading.Barrier(8)
    managers: list[Manager] = []

    def get() -> None:
        barrier.wait()
        managers.append(shared(settings.with_(port=18000 + len(managers))))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(managers) == 8 and len({id(m) for m in managers}) == 1
    manager = managers[0]
    mine: list[Progress] = []
    with pytest.raises(ServerFailed) as error:
        # this call's interpreter and port, not the ones the manager was made with
        manager.serve_model(settings.models_root / DEMO_BASE, settings=settings.with_(python=bare_python, port=18555),
                            progress=mine.append)
    assert "ModuleNotFoundError" in str(error.value)
    assert any(e.phase == "launch" and "port 18555" in e.message for e in mine)
    manager.close()


def test_cancel_while_waiting_for_the_server_ends_the_call_and_releases_it(
        short_runtime: Path, demo_home: Path, tmp_path: Path,
                                                                          hanging_python: str) -> None:
    settings = make_settings(demo_home, short_runtime, python=hanging_python)
    manager = Manager(settings)
    cancel = threading.Event()
    phases: list[str] = []
    thread, errors = _in_thread(lambda: manager.serve_model(settings.models_root / DEMO_BASE, progress=lambda e:
                                                            phases.append(e.phase), cancel=cancel))
    assert wait_until(lambda: "launch" in phases and any(r.pid for r in manager.registry.all()), 30)
    cancel.set()
    thread.join(30)
    assert not thread.is_alive() and errors and isinstance(errors[0], Cancelled)
    # the lease it took is released: with keep-alive 0 the hanging server goes
    assert wait_until(lambda: not manager.registry.all() and not sage_processes(settings.runtime_dir), 20)
    manager.close()


def test_cancel_while_another_process_merges_ends_the_call(
        short_runtime: Path, demo_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    settings = make_settings(home, short_runtime)
    manager = Manager(settings)
    cancel = threading.Event()
    with exclusive(settings.finetune_root / "demo_poet" / ".merge.lock"):  # "another process is merging"
        thread, errors = _in_thread(lambda: manager.serve_finetune("demo_poet", merge=True, cancel=cancel))
        thread.join(1)
        assert thread.is_alive()  # waiting for the merge
        cancel.set()
        thread.join(30)
    assert not thread.is_alive() and errors and isinstance(errors[0], Cancelled)
    assert manager.registry.all() == [] and not (settings.finetune_root / "demo_poet" / "merged_model").exists()


def test_cancel_while_waiting_for_the_registry_ends_the_call(
        short_runtime: Path, demo_home: Path, tmp_path: Path) -> None:
    settings: Settings = make_settings(demo_home, short_runtime)
    manager = Manager(settings)
    cancel = threading.Event()
    with manager.registry.locked():  # another process is starting a server
        thread, errors = _in_thread(lambda: manager.serve_finetune("demo_expert", cancel=cancel))
        thread.join(1)
        assert thread.is_alive()
        cancel.set()
        thread.join(30)
    assert not thread.is_alive() and errors and isinstance(errors[0], Cancelled)
    assert manager.registry.all() == []


def test_a_server_stopped_right_after_it_was_picked_for_reuse_is_replaced(
        short_runtime: Path, demo_home: Path, tmp_path: Path,
                                                                          hanging_python: str) -> None:
    """`sage stop` (or a keep-alive running out) landing between the lookup and the hand-out: the reuse must
    notice and start another server, not hand out one that is about to die."""
    settings = make_settings(demo_home, short_runtime, python=hanging_python)
    manager = Manager(settings)
    base = settings.models_root / DEMO_BASE
    first_cancel, second_cancel = threading.Event(), threading.Event()
    first, _ = _in_thread(lambda: manager.serve_model(base, cancel=first_cancel))
    assert wait_until(lambda: any(r.pid for r in manager.registry.all()), 30)
    (picked,) = manager.registry.all()
    phases: list[str] = []

    def stop_it_now(event: Progress) -> None:
        phases.append(event.phase)
        if event.phase == "reuse":
            with manager.registry.locked():  # what `sage stop` does first
                record = manager.registry.get(picked.id)
                record.state = "stopping"
                manager.registry.save(record)

    second, errors = _in_thread(lambda: manager.serve_model(base, progress=stop_it_now, cancel=second_cancel))
    assert wait_until(lambda: "launch" in phases, 30), phases
    assert phases[0] == "reuse" and {r.id for r in manager.registry.all()} - {picked.id}
    first_cancel.set()
    second_cancel.set()
    first.join(30)
    second.join(30)
    assert errors and isinstance(errors[0], Cancelled)
    assert wait_until(lambda: not manager.registry.all() and not sage_processes(settings.runtime_dir), 20)
    manager.close()


def test_a_one_shot_close_waits_for_a_supervisor_whose_record_is_already_gone(short_runtime: Path,
                                                                             tmp_path: Path) -> None:
    """`sage chat --ask` returns through close(wait=True), which looked its servers up only then: a supervisor
    that had already removed its record (its last step before it exits) was not waited for, so the command
    could return while it still ran. The stand-in "supervisor" carries the server's mark and no record."""
    from sage_magic.serving.registry import new_server_id

    manager = Manager(make_settings(tmp_path, short_runtime))
    server_id = new_server_id()
    supervisor = marked(server_id, ["sleep", "1"])
    manager._used[server_id] = supervisor.pid  # what its lease, released before, left the manager knowing
    manager.close(wait=True)
    assert supervisor.poll() is not None
