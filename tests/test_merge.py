"""Merging is atomic and cached: a second request is free, a killed or failed merge leaves nothing behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sage_magic.core.errors import MergeFailed
from sage_magic.core.progress import Progress
from sage_magic.core.staging import leftovers
from sage_magic.finetune.catalog import MERGED_MARKER, get_finetune
from sage_magic.serving.merge import ensure_merged, merged_fingerprint_on_disk
from tests.conftest import env_for, make_settings


@pytest.fixture
def settings_copy(demo_home: Path, tmp_path: Path):
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    return make_settings(home, tmp_path / "run")


def test_merge_reports_progress_and_a_second_request_costs_nothing(settings_copy) -> None:
    ft = get_finetune(settings_copy, "demo_poet")
    events: list[Progress] = []
    path = ensure_merged(settings_copy, ft, events.append)
    assert (path / MERGED_MARKER).is_file() and (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() and get_finetune(settings_copy, "demo_poet").is_merged
    fractions = [e.fraction for e in events if e.fraction is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 4
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again: list[Progress] = []
    assert ensure_merged(settings_copy, ft, again.append) == path
    assert again == [] and (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_retrained_adapter_is_merged_again(settings_copy) -> None:
    ft = get_finetune(settings_copy, "demo_poet")
    ensure_merged(settings_copy, ft)
    before = merged_fingerprint_on_disk(ft)
    checkpoint = ft.checkpoints[0][1]  # another adapter with the same shapes: "retraining" it
    shutil.copy(checkpoint / "adapter_model.safetensors", ft.adapter_dir / "adapter_model.safetensors")
    ensure_merged(settings_copy, get_finetune(settings_copy, "demo_poet"))
    assert merged_fingerprint_on_disk(ft) not in (None, before)


def test_killed_merge_leaves_no_half_written_model(settings_copy) -> None:
    ft = get_finetune(settings_copy, "demo_poet")
    proc = subprocess.Popen([sys.executable, "-m", "sage_magic.cli.main", "finetune", "merge", "demo_poet"],
                            env=env_for(settings_copy), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:  # the worker's first progress report: it is merging into its staging folder
        if "loading base model" in line:
            break
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    assert leftovers(ft.merged_dir)
    worker = _children_of(proc.pid)
    assert worker
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the orphaned merge worker notices and stops by itself
    assert all(_gone(child) for child in worker)
    assert not ft.merged_dir.exists()
    assert not get_finetune(settings_copy, "demo_poet").is_merged
    # the next merge cleans up the leftovers and succeeds
    ensure_merged(settings_copy, ft)
    assert not leftovers(ft.merged_dir) and ft.is_merged


def _gone(proc) -> bool:
    import psutil

    try:
        proc.wait(timeout=10)
    except psutil.TimeoutExpired:
        return False
    return True


def _children_of(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_failed_merge_keeps_the_previous_merged_model(settings_copy) -> None:
    ft = get_finetune(settings_copy, "demo_poet")
    ensure_merged(settings_copy, ft)
    good = merged_fingerprint_on_disk(ft)
    (ft.adapter_dir / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MergeFailed) as error:
        ensure_merged(settings_copy, get_finetune(settings_copy, "demo_poet"))
    assert "nothing was changed" in str(error.value)
    assert merged_fingerprint_on_disk(ft) == good and (ft.merged_dir / "model.safetensors").is_file()
    assert not leftovers(ft.merged_dir)


def test_a_cancelled_merge_stops_its_worker_and_leaves_nothing(settings_copy) -> None:
    import threading

    from sage_magic.core.errors import Cancelled

    ft = get_finetune(settings_copy, "demo_poet")
    cancel = threading.Event()

    def progress(event: Progress) -> None:
        if "loading base model" in event.message:  # the worker is merging into its staging folder now
            cancel.set()

    with pytest.raises(Cancelled):
        ensure_merged(settings_copy, ft, progress, cancel)
    assert not ft.merged_dir.exists() and not leftovers(ft.merged_dir)
    assert not get_finetune(settings_copy, "demo_poet").is_merged
