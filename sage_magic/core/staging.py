"""Publishing a model folder atomically: build it beside its target, then rename it into place.

Used for everything the engine writes that a server may load (the demo models, merged models): a reader
sees the old complete folder or the new complete one, never a half-written one. Staging folders sit next to
the target (same file system, so the rename is atomic) and are hidden, so a killed writer leaves only
hidden leftovers that :func:`sweep_leftovers` removes under the writer's lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_KINDS = ("building", "old")


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A fresh hidden folder next to ``target``, removed on exit unless :func:`publish` moved it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an older version is renamed aside first, then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def leftovers(target: Path) -> list[Path]:
    """Staging and set-aside folders of ``target`` that exist right now."""
    return [p for kind in _KINDS for p in target.parent.glob(f".{target.name}.{kind}-*")]


def sweep_leftovers(target: Path) -> None:
    """Remove what a killed writer left (call only while holding the writer's lock).

    A writer killed between :func:`publish`'s two renames left the previous version set aside and nothing at
    ``target``: that version is put back, never deleted, so no crash loses the folder a user had.
    """
    for leftover in leftovers(target):
        aside = leftover / target.name
        if ".old-" in leftover.name and not target.exists() and aside.is_dir():
            os.replace(aside, target)
        shutil.rmtree(leftover, ignore_errors=True)
