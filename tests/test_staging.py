"""Publishing folders atomically: what a writer killed at any point leaves behind is swept without loss."""

from __future__ import annotations

import os
from pathlib import Path

from sage_magic.core.staging import leftovers, publish, staging, sweep_leftovers


def test_publish_replaces_the_old_version_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with staging(target) as tmp:
        (tmp / "weights").write_text("new")
        publish(tmp, target)
    assert (target / "weights").read_text() == "new" and leftovers(target) == []


def test_a_writer_killed_between_the_two_renames_loses_nothing(tmp_path: Path) -> None:
    """publish() moves the old folder aside, then the new one in: a kill in between leaves no target."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    aside = tmp_path / ".model.old-x1"
    aside.mkdir()
    os.replace(target, aside / "model")  # the first rename happened; the writer died before the second
    (tmp_path / ".model.building-x2").mkdir()  # and its unfinished new version is still there
    sweep_leftovers(target)
    assert (target / "weights").read_text() == "old" and leftovers(target) == []


def test_a_sweep_after_a_complete_publish_only_removes_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("new")
    (tmp_path / ".model.old-x1" / "model").mkdir(parents=True)  # killed before deleting the old version
    sweep_leftovers(target)
    assert (target / "weights").read_text() == "new" and leftovers(target) == []
