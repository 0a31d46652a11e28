"""The default index store: files under the index's folder, searched with FAISS (dense) and bm25s (lexical).

Layout of ``settings.index_root / NAME``::

    manifest.json        what the index is (embedder, chunking, patterns, files) and which generation serves
    gen-000007/          one complete generation: chunks.jsonl (row order), vectors.npy, bm25/, dense.faiss (IVF)
    .lock                held by the one process writing this index

A writer builds the next generation in a hidden temporary folder, renames it to ``gen-N``, then replaces
``manifest.json`` with ``os.replace``: until that instant readers see the old generation, after it the new
one. A killed writer leaves only hidden leftovers, which the next writer removes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import SageError
from . import dense, lexical
from .records import (
    HYBRID_DEPTH,
    MANIFEST,
    RRF_K,
    Chunk,
    Manifest,
    Planned,
    read_manifest_in,
    search_text,
    write_manifest,
)

if TYPE_CHECKING:
    import numpy as np

class LocalStore:
    """FAISS + BM25 files in the index folder: nothing to run, one machine."""

    kind = "local"

    def reader(self, folder: Path) -> Generation:
        return open_generation(folder)

    def check(self, name: str) -> None:
        """Local files need nothing running."""

    def commit(self, folder: Path, manifest: Manifest, old: Manifest | None, rows: list[Planned],
               fresh: list[Chunk], embedded: np.ndarray) -> Manifest:
        """Write the next generation (copied rows from the old one, fresh rows from ``embedded``), then switch."""
        import numpy as np

        previous = Generation(folder / old.generation, old) if old and old.generation else None
        chunks, vectors = [], np.empty((len(rows), embedded.shape[1]), dtype=np.float32)
        for row, planned in enumerate(rows):
            if isinstance(planned.origin, int):
                chunks.append(replace(fresh[planned.origin], id=planned.id))
                vectors[row] = embedded[planned.origin]
            else:
                assert previous is not None
                at = previous.rows[planned.origin]
                chunks.append(replace(previous.chunks[at], id=planned.id, source=planned.source))
                vectors[row] = previous.vectors[at]
        number = int(manifest.generation.split("-")[1]) + 1 if manifest.generation else 1
        generation = write_generation(folder, number, chunks, vectors, previous.dense if previous else None)
        manifest = replace(manifest, generation=generation)
        write_manifest(folder, manifest)
        clean_leftovers(folder, keep=generation)
        return manifest

    def remove(self, folder: Path) -> None:
        _open_cached.cache_clear()

    def footprint(self, folder: Path, manifest: Manifest) -> tuple[str, int | None]:
        generation = folder / manifest.generation
        size = sum(p.stat().st_size for p in generation.rglob("*") if p.is_file()) if manifest.generation else 0
        return ("exact" if manifest.chunk_count <= dense.FLAT_LIMIT else "ivf"), size


def clean_leftovers(folder: Path, keep: str) -> None:
    """Delete generations other than ``keep`` and temporaries of killed writers (call with the lock held)."""
    for entry in folder.iterdir():
        if entry.name in (MANIFEST, ".lock", keep):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def write_generation(
    folder: Path,
    number: int,
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    previous_dense: Any | None = None,
) -> str:
    """Write a complete generation under a hidden name, then rename it into place; returns its name.

    The manifest still points at the old generation afterwards: switching is the caller's atomic step.
    """
    import numpy as np

    name = f"gen-{number:06d}"
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    with open(temporary / "chunks.jsonl", "w") as handle:
        for chunk in chunks:
            handle.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
    np.save(temporary / "vectors.npy", vectors)
    if chunks:  # BM25 cannot index an empty corpus; an index whose files are all gone answers nothing
        lexical.save(lexical.build([search_text(c) for c in chunks]), temporary / "bm25")
    if len(chunks) > dense.FLAT_LIMIT:
        dense.save(dense.build(vectors, previous_dense), temporary / "dense.faiss")
    os.replace(temporary, folder / name)
    return name


class Generation:
    """A generation opened for reading, with both search structures in memory.

    Everything is loaded up front: a writer may delete this folder right after, and open files (the
    memory-mapped vectors) survive that while files opened later would not.
    """

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        import numpy as np

        self.manifest = manifest
        with open(folder / "chunks.jsonl") as handle:
            self.chunks = [Chunk(**json.loads(line)) for line in handle]
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        saved = folder / "dense.faiss"
        self.dense = dense.load(saved) if saved.exists() else dense.build(np.ascontiguousarray(self.vectors))
        self.lexical = lexical.load(folder / "bm25") if self.chunks else None
        self.rows = {chunk.id: row for row, chunk in enumerate(self.chunks)}

    def search(self, mode: str, query: str, vector: np.ndarray | None, top_k: int) -> list[tuple[Chunk, float]]:
        count = len(self.chunks)
        if count == 0:
            return []
        depth = top_k * HYBRID_DEPTH if mode == "hybrid" else top_k
        rankings = []
        if mode in ("dense", "hybrid"):
            assert vector is not None
            rankings.append(dense.search(self.dense, vector, depth))
        if mode in ("lexical", "hybrid"):
            rankings.append(lexical.search(self.lexical, query, depth, count))
        ranked = rrf(rankings)[:top_k] if mode == "hybrid" else rankings[0]
        return [(self.chunks[row], score) for row, score in ranked]


def rrf(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of best-first rankings of (row, score): (row, fused score), best first.

    RRF (Cormack et al., 2009) adds 1 / (60 + rank) over the rankings: it needs no score calibration between
    cosine similarities and BM25 scores, and a chunk both searches like wins over one only one likes."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (row, _) in enumerate(ranking, start=1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def open_generation(folder: Path) -> Generation:
    """The generation serving the index in ``folder`` now, shared across calls until the manifest is replaced."""
    for _ in range(3):  # a writer may delete the generation we just read about: read the manifest again
        try:
            stat = (folder / MANIFEST).stat()
        except FileNotFoundError:
            read_manifest_in(folder)  # raises NotFound with the known names
            continue  # the manifest appeared meanwhile
        try:
            with _OPENING:  # two threads asking for a cold index load it once
                return _open_cached(folder, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            continue
    raise SageError(f"Index {folder.name!r} is being rewritten too often to be read; try again in a moment.")


_OPENING = threading.Lock()


@functools.lru_cache(maxsize=4)
def _open_cached(folder: Path, _ino: int, _mtime_ns: int, _size: int) -> Generation:
    manifest = read_manifest_in(folder)
    return Generation(folder / manifest.generation, manifest)
