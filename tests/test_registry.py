"""The registry: private files, stale records reaped, and what a dead supervisor left behind killed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from sage_magic.serving.registry import Owner, Registry, ServerRecord, new_server_id
from tests.conftest import make_settings, marked


def _record(registry: Registry, supervisor_pid: int, pid: int | None) -> ServerRecord:
    server_id = new_server_id()
    return ServerRecord(id=server_id, kind="base", identity="x", model_path="/m", served_name="m", host="127.0.0.1",
                        port=1, api_key="secret", log_path=str(registry.log_path(server_id)),
                        supervisor_pid=supervisor_pid, keep_alive=0.0, started_at=time.time(), pid=pid,
                        owners=[Owner.this_process()])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_files_are_private(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    with registry.locked():
        registry.save(_record(registry, os.getpid(), None))
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    (path,) = (tmp_path / "run" / "servers").iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_stale_records_are_reaped_and_orphaned_servers_killed(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    stale = _record(registry, _dead_pid(), None)
    orphaned = _record(registry, _dead_pid(), None)
    orphan = marked(orphaned.id)  # the server of a supervisor that died
    orphaned.pid = orphan.pid
    alive = _record(registry, 0, None)
    supervisor = marked(alive.id)  # a live supervisor: its record stays
    alive.supervisor_pid = supervisor.pid
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)  # got a dead server's pid, say
    recycled = _record(registry, _dead_pid(), stranger.pid)
    try:
        with registry.locked():
            for record in (stale, orphaned, alive, recycled):
                registry.save(record)
            reaped = registry.reap()
        assert sorted(reaped) == sorted([stale.id, orphaned.id, recycled.id])
        assert [r.id for r in registry.all()] == [alive.id]
        assert orphan.wait(timeout=10) is not None
        assert stranger.poll() is None and supervisor.poll() is None  # not ours: untouched
    finally:
        for proc in (orphan, supervisor, stranger):
            proc.kill()
            proc.wait()


def test_a_recycled_pid_is_not_an_owner() -> None:
    me = Owner.this_process()
    assert me.alive()
    assert not Owner(me.pid, me.created - 100).alive()
    assert not Owner(_dead_pid(), time.time()).alive()


def test_the_supervisor_marks_a_server_stopping_in_the_step_that_decides_it(tmp_path: Path) -> None:
    """A reuse landing between "stop it" and the "stopping" mark got an endpoint that was about to die; now
    the decision and the mark are one locked step, so a lookup under the lock never sees the gap."""
    from sage_magic.serving.supervisor import Supervisor

    registry = Registry(tmp_path / "run")
    record = _record(registry, os.getpid(), None)
    record.owners = [Owner(_dead_pid(), time.time(), "lease-of-a-dead-kernel")]
    with registry.locked():
        registry.save(record)
    supervisor = Supervisor(registry, record.id, [], grace=1.0)
    supervisor._check_owners()
    assert supervisor.stop_reason == "its last owner left"
    current = registry.get(record.id)
    assert current.state == "stopping" and current.owners == []


def test_the_supervisor_exits_cleanly_while_its_launcher_pipe_is_still_open(tmp_path: Path) -> None:
    """The stdin watcher used to block inside a buffered reader; when the supervisor then finished (here: its
    record vanished before start) the interpreter's shutdown aborted with "Fatal Python error:
    _enter_buffered_busy", status 134, and a core-dump message in the server log a user reads."""
    registry = Registry(tmp_path / "run")
    registry.log_path("gone").parent.mkdir(parents=True, exist_ok=True)
    launcher = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)  # holds the pipe open, like a kernel
    try:
        supervisor = subprocess.run(
            [sys.executable, "-m", "sage_magic.serving.supervisor", "--runtime-dir", str(registry.root), "--id",
             "gone", "--", "sleep", "5"], stdin=launcher.stdout, capture_output=True, text=True, timeout=60)
    finally:
        launcher.kill()
        launcher.wait()
    assert supervisor.returncode == 0, supervisor.stderr
    assert "Fatal Python error" not in supervisor.stderr
    assert "server stopped" in registry.log_path("gone").read_text()


def test_leases_of_one_process_are_counted_one_by_one(tmp_path: Path) -> None:
    """Two leases of this process: releasing one keeps the other, so the server keeps an owner."""
    from sage_magic.serving.manager import Manager

    manager = Manager(make_settings(tmp_path / "home", tmp_path / "run"))
    record = _record(manager.registry, os.getpid(), None)
    record.owners = [Owner.this_process("a"), Owner.this_process("b")]
    with manager.registry.locked():
        manager.registry.save(record)
    manager._leases.update({"a": record.id, "b": record.id})
    manager._release("a")
    manager._release("a")  # twice: still only one dropped
    assert [o.lease for o in manager.registry.get(record.id).owners] == ["b"]


def test_stop_all_goes_on_past_a_server_that_is_already_gone(tmp_path: Path) -> None:
    """`sage stop --all` gave up at the first server that vanished while it stopped the others."""
    from sage_magic.serving.manager import Manager

    manager = Manager(make_settings(tmp_path / "home", tmp_path / "run", stop_grace=2.0))
    registry = manager.registry
    first, second, third = (_record(registry, 0, None) for _ in range(3))
    for n, record in enumerate((first, second, third)):
        record.started_at += n  # stop_all goes oldest first
    # first's supervisor, when stopped, takes second's record with it (second stopped on its own meanwhile)
    gone = registry.servers / f"{second.id}.json"
    first_sup = marked(first.id, ["sh", "-c", f'trap "rm -f {gone}; exit 0" TERM; while :; do sleep 0.1; done'])
    second_sup, third_sup = marked(second.id), marked(third.id)
    try:
        for record, proc in ((first, first_sup), (second, second_sup), (third, third_sup)):
            record.supervisor_pid = proc.pid
            with registry.locked():
                registry.save(record)
        stopped = manager.stop_all()
        assert {first.id, third.id} <= {r.id for r in stopped}
        assert registry.all() == [] and third_sup.wait(timeout=10) is not None
    finally:
        for proc in (first_sup, second_sup, third_sup):
            proc.kill()
            proc.wait()


def test_a_confirmed_server_is_trusted_unasked_only_while_its_processes_and_record_stay(tmp_path: Path) -> None:
    """A warm reuse asks a server this manager confirmed before nothing (no /health, no /v1/models). That
    trust must end for good when the record says stopping, names another process, or the server process is
    gone; the next reuse then takes the full look-up with both checks again."""
    from sage_magic.serving.manager import Manager, _spec

    manager = Manager(make_settings(tmp_path / "home", tmp_path / "run"))
    registry = manager.registry
    spec = _spec("base", Path("/m"), "m", ("weights",), ())
    record = _record(registry, 0, None)
    server, supervisor = marked(record.id), marked(record.id)
    record.pid, record.supervisor_pid = server.pid, supervisor.pid
    record.identity, record.state = spec.identity, "ready"

    def trusted(change: Callable[[ServerRecord], None] | None = None) -> bool:
        with registry.locked():
            current = registry.get(record.id)
            if change is not None:
                change(current)
                registry.save(current)
            return manager._confirmed_record(spec) is not None

    try:
        with registry.locked():
            registry.save(record)
        assert not trusted()  # never confirmed by this manager
        manager._remember(record, spec)
        assert trusted()
        assert not trusted(lambda r: setattr(r, "state", "stopping"))
        assert not trusted(lambda r: setattr(r, "state", "ready"))  # forgotten: it must be confirmed again
        manager._remember(record, spec)
        assert not trusted(lambda r: setattr(r, "pid", supervisor.pid))
        assert not trusted(lambda r: setattr(r, "pid", server.pid))
        manager._remember(record, spec)
        server.kill()
        server.wait()
        assert not trusted()
    finally:
        for proc in (server, supervisor):
            proc.kill()
            proc.wait()


def test_a_process_in_the_middle_of_an_exec_is_still_ours() -> None:
    """CI once failed a first chat with "The supervisor process ... exited after 0 s" while the supervisor
    ran on: Linux swaps in a new program (and lets Popen return) before it sets up that program's
    environment, so the SAGE_SERVER_ID mark read from /proc was missing, and wait_ready took the supervisor
    for gone. The gap lasts microseconds after a plain spawn, too rarely to catch through a launch, but
    again after every exec of a wrapper (the serving interpreter may be a shim). This stand-in shows an
    empty environment for 0.1 s, then execs with the mark: the view a launcher got inside the gap."""
    from sage_magic.core.processes import is_ours

    server_id = new_server_id()
    child = subprocess.Popen(["/bin/sh", "-c", f"sleep 0.1; exec env SAGE_SERVER_ID={server_id} sleep 60"], env={})
    try:
        assert is_ours(child.pid, server_id)
    finally:
        child.kill()
        child.wait()
