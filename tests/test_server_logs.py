"""Server logs: 0600, still found by id once their server is gone, listed by `sage logs`, and pruned."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from sage_magic.cli.main import main
from sage_magic.core.config import Settings
from sage_magic.serving import logs as server_logs
from sage_magic.serving.manager import Manager
from sage_magic.serving.registry import Owner, Registry, ServerRecord


def _log(registry: Registry, server_id: str, age: float = 0.0) -> Path:
    path = registry.log_path(server_id)
    server_logs.create(path, server_id, f"demo_{server_id} (base) from /models/x")
    with open(path, "a") as log:
        log.write("ValueError: the cause\n")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_a_finished_servers_log_is_private_found_by_id_and_listed(tmp_path: Path, monkeypatch, capsys) -> None:
    settings = Settings.from_env({}, home=tmp_path / "home", runtime_dir=tmp_path / "run")
    manager = Manager(settings)
    with manager.registry.locked():
        path = _log(manager.registry, "0badc0de")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert manager.registry.get("0badc0de") is None  # no record: the server is gone
    assert "ValueError: the cause" in manager.logs("0bad")
    monkeypatch.setenv("SAGE_RUNTIME_DIR", str(settings.runtime_dir))
    monkeypatch.setenv("SAGE_HOME", str(settings.home))
    assert main(["logs", "0badc0de", "-n", "1"]) == 0
    assert capsys.readouterr().out.strip() == "ValueError: the cause"
    assert main(["logs"]) == 0
    listing = capsys.readouterr().out
    assert "0badc0de" in listing and "ended" in listing and "demo_0badc0de (base) from /models/x" in listing
    assert main(["logs", "feedface"]) == 2
    assert "No server log matches 'feedface'" in capsys.readouterr().err


def test_prune_keeps_the_newest_and_recent_logs_and_every_running_servers(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    with registry.locked():
        ids = [f"{n:08x}" for n in range(25)]
        for rank, server_id in enumerate(ids):  # ids[0] newest
            _log(registry, server_id, age=60.0 * rank)
        old = _log(registry, "0000dead", age=8 * 24 * 3600.0)
        running = _log(registry, "0000beef", age=30 * 24 * 3600.0)
        registry.save(ServerRecord(id="0000beef", kind="base", identity="x", model_path="/m", served_name="m",
                                   host="127.0.0.1", port=None, api_key="k", log_path=str(running),
                                   supervisor_pid=os.getpid(), keep_alive=0.0, started_at=time.time(),
                                   owners=[Owner.this_process()]))
        pruned = server_logs.prune(registry)
    assert sorted(pruned) == sorted(ids[20:] + ["0000dead"])
    assert not old.exists() and running.exists()
    assert sorted(p.stem for p in registry.logs.iterdir()) == sorted(ids[:20] + ["0000beef"])
