"""A base server carrying a hundred fine-tunes stays readable: `sage ps`, `%sage status`, the server
extension's list and the errors that name fine-tunes show a count and a folded list, never a wall of names;
`--all` and `--json` still give every one. Owners count processes, not the lease a kernel holds per fine-tune.

The records are written by hand (no vLLM): what is checked is how the faces show a registry of this size,
which a real server with a hundred adapters only reaches in the benchmark (benchmarks/hundred_bench.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_magic.core.errors import NotFound, fold
from sage_magic.finetune.catalog import get_finetune
from sage_magic.serving.registry import Owner, Registry, ServerRecord, live_owners, new_server_id
from sage_magic.serving.servers import statuses
from tests.conftest import env_for, make_settings

NAMES = [f"ft_{i:03d}" for i in range(100)]


def _dead_owner() -> Owner:
    proc = subprocess.Popen(["true"])
    owner = Owner.of(proc.pid, "dead-kernel")
    proc.wait()
    return owner


@pytest.fixture
def other_kernel():
    """A second live process holding leases, as another kernel would."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _hundred(registry: Registry, other: subprocess.Popen) -> ServerRecord:
    """A base server record with 100 adapters and a lease per adapter from this process and from another."""
    server_id = new_server_id()
    record = ServerRecord(id=server_id, kind="base", identity="x", model_path="/m", served_name="demo_base",
                          host="127.0.0.1", port=None, api_key="secret", log_path=str(registry.log_path(server_id)),
                          supervisor_pid=os.getpid(), keep_alive=0.0, started_at=time.time(),
                          adapters={n: {"path": f"/ft/{n}", "fingerprint": "f"} for n in NAMES},
                          owners=[Owner.this_process(f"me-{n}") for n in NAMES]
                          + [Owner.of(other.pid, f"other-{n}") for n in NAMES] + [_dead_owner()])
    with registry.locked():
        registry.save(record)
    return record


def test_fold_gives_a_count_not_a_wall() -> None:
    assert fold(NAMES) == "ft_000, ft_001, ft_002 and 97 more"
    assert fold(NAMES[:4]) == "ft_000, ft_001, ft_002, ft_003"  # "and 1 more" would be longer than the name
    assert fold([]) == ""


def test_live_owners_keeps_every_live_lease_and_drops_the_dead(tmp_path: Path, other_kernel) -> None:
    record = _hundred(Registry(tmp_path / "run"), other_kernel)
    kept = live_owners(record.owners)
    assert len(kept) == 200 and all(o.lease != "dead-kernel" for o in kept)
    assert kept == record.owners[:200]  # in order


def test_sage_ps_folds_the_adapters_and_all_lists_them(tmp_path: Path, other_kernel) -> None:
    settings = make_settings(tmp_path / "home", tmp_path / "run")
    record = _hundred(Registry(settings.runtime_dir), other_kernel)
    env = env_for(settings)

    def sage(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", *args], capture_output=True, text=True,
                             env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = sage("ps")
    header, row, *rest = table.splitlines()
    assert "100: ft_000, ft_001, ft_002 and 97 more" in row and "ft_050" not in table
    assert max(len(line) for line in table.splitlines()) < 200
    assert "sage ps --all" in rest[-1] and "--json" in rest[-1]
    assert row[header.index("OWNERS"):].split()[0] == "2"  # two kernels, whatever their 200 leases
    everything = sage("ps", "--all")
    assert f"{record.id} (demo_base): 100 adapters" in everything
    assert all(name in everything for name in NAMES)
    assert max(len(line) for line in everything.splitlines()) < 200
    (listed,) = json.loads(sage("ps", "--json"))
    assert listed["adapters"] == NAMES and listed["owners"] == 2 and listed["leases"] == 200


def test_status_magic_folds_in_the_table_and_lists_all_collapsed(shell, other_kernel) -> None:
    session = shell.magics_manager.registry["SageMagics"].session
    record = _hundred(session.manager.registry, other_kernel)
    shell.run_line_magic("sage", "status")
    (shown,) = [o["data"] for o in shell.display_pub.outputs]
    page = shown["text/html"]
    table, details = page.split("<details>", 1)
    assert "100: ft_000, ft_001, ft_002 and 97 more" in table and "ft_050" not in table
    assert f"<summary>{record.id} (demo_base): 100 adapters</summary>" in page and "ft_099" in details
    assert "ft_050" not in shown["text/plain"] and "sage ps --all" in shown["text/plain"]
    shell.display_pub.outputs.clear()
    shell.run_line_magic("sage", "status --all")
    (shown,) = [o["data"] for o in shell.display_pub.outputs]
    assert all(name in shown["text/plain"] for name in NAMES)


def test_status_rows_count_processes_as_owners(tmp_path: Path, other_kernel) -> None:
    (status,) = statuses(_registry_with_hundred(tmp_path, other_kernel))
    assert status.alive_owners == 2 and status.leases == 200


def _registry_with_hundred(tmp_path: Path, other: subprocess.Popen) -> Registry:
    registry = Registry(tmp_path / "run")
    _hundred(registry, other)
    return registry


def test_unknown_finetune_among_a_hundred_names_the_closest_and_counts_the_rest(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", tmp_path / "run")
    for name in NAMES:
        folder = settings.finetune_root / name
        folder.mkdir(parents=True)
        (folder / "finetune_meta.json").write_text('{"model": "demo_base"}')
    with pytest.raises(NotFound) as error:
        get_finetune(settings, "ft-050")
    message = str(error.value)
    assert "Known fine-tunes, closest first: 100: ft_050, " in message and "and 97 more" in message
    assert sum(name in message for name in NAMES) == 3
