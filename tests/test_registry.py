"""The registry: private files, stale records reaped, and what a dead supervisor left behind killed."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

from sage_magic.registry import Owner, Registry, ServerRecord, new_server_id


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


def _marked(server_id: str) -> subprocess.Popen:
    """A stand-in process carrying the mark the launcher puts on a server's processes."""
    return subprocess.Popen(["sleep", "60"], start_new_session=True, env={**os.environ, "SAGE_SERVER_ID": server_id})


def test_stale_records_are_reaped_and_orphaned_servers_killed(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    stale = _record(registry, _dead_pid(), None)
    orphaned = _record(registry, _dead_pid(), None)
    orphan = _marked(orphaned.id)  # the server of a supervisor that died
    orphaned.pid = orphan.pid
    alive = _record(registry, 0, None)
    supervisor = _marked(alive.id)  # a live supervisor: its record stays
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
