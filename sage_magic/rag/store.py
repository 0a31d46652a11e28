"""Where an index lives on disk and how a new version replaces the old one without a half-written moment.

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
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import Settings
from ..core.errors import NotFound, SageError
from ..core.files import subfolders, write_json_atomic
from . import dense, lexical
from .chunker import ChunkSettings
from .embedder import DEFAULT_EMBEDDER_ID, ONNX, TORCH, EmbedderRef, onnx_missing, resolve_embedder

if TYPE_CHECKING:
    import numpy as np

MANIFEST = "manifest.json"
FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Chunk:
    """One searchable row: the text shown to people and models, and where it came from."""

    id: str
    source: str
    location: str
    text: str


@dataclass
class FileEntry:
    """What an index knows about one file: enough to tell, by stat then hash, whether it changed."""

    size: int
    mtime_ns: int
    sha256: str
    chunks: list[str]


@dataclass
class Manifest:
    """The description of an index; ``generation`` names the folder that currently serves it."""

    name: str
    embedder: str
    dim: int
    chunking: ChunkSettings
    root: str
    patterns: list[str]
    generation: str = ""
    files: dict[str, FileEntry] = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    backend: str = TORCH  # what computed the vectors; indexes from before backends existed are all torch
    export_format: int = 1  # with backend onnx: the export recipe (embedder.EXPORT_FORMAT); older indexes: 1

    @property
    def chunk_count(self) -> int:
        return sum(len(entry.chunks) for entry in self.files.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        values = {k: v for k, v in data.items() if k != "format"}
        values["chunking"] = ChunkSettings(**data["chunking"])
        values["files"] = {path: FileEntry(**entry) for path, entry in data["files"].items()}
        return cls(**values)


# ---------------------------------------------------------------------------------------------- names


def check_name(name: str) -> str:
    """Index names become folder names: letters, digits, '-', '_' and '.', not starting with a dot."""
    if not _NAME.fullmatch(name or ""):
        raise SageError(
            f"{name!r} is not a valid index name. Use 1 to 64 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit (for example `docs` or `project-notes`)."
        )
    return name


def index_dir(settings: Settings, name: str) -> Path:
    return settings.index_root / check_name(name)


def index_exists(settings: Settings, name: str) -> bool:
    """Whether a complete index of that name exists (a first build killed midway does not count)."""
    return (index_dir(settings, name) / MANIFEST).is_file()


def known_names(settings: Settings) -> list[str]:
    return _known(settings.index_root)


def _known(root: Path) -> list[str]:
    """Complete indexes under ``root``: folders with a manifest and a name `check_name` accepts."""
    return [name for name in subfolders(root, MANIFEST) if _NAME.fullmatch(name)]


def read_manifest(settings: Settings, name: str) -> Manifest:
    """The manifest of an existing index, or NotFound naming the indexes that do exist."""
    return _read_manifest(index_dir(settings, name))


def _read_manifest(folder: Path) -> Manifest:
    path, name = folder / MANIFEST, folder.name
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        known = _known(folder.parent)
        listing = f"Known indexes: {', '.join(known)}." if known else "There are no indexes yet."
        raise NotFound(
            f"There is no index named {name!r} in {folder.parent}. {listing} "
            f"Create it with `sage index add {name} PATH...`."
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise SageError(
            f"The manifest of index {name!r} ({path}) is unreadable ({error}). Rebuild the index with "
            f"`sage index add {name} PATH... --rebuild`."
        ) from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically: readers see the old or the new one, whole (see files.py)."""
    write_json_atomic(folder / MANIFEST, manifest.to_json())


def remove_index(settings: Settings, name: str) -> None:
    read_manifest(settings, name)  # NotFound with the known names
    shutil.rmtree(index_dir(settings, name))
    _open_cached.cache_clear()


def clean_leftovers(folder: Path, keep: str) -> None:
    """Delete generations other than ``keep`` and temporaries of killed writers (call with the lock held)."""
    for entry in folder.iterdir():
        if entry.name in (MANIFEST, ".lock", keep):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@dataclass(frozen=True)
class IndexInfo:
    """What `sage index list/show` print: an index's settings, size and files (source, bytes, chunks)."""

    name: str
    files: int
    chunks: int
    embedder: str
    backend: str
    dim: int
    chunk_size: int
    chunk_overlap: int
    search: str
    disk_bytes: int
    root: str
    patterns: tuple[str, ...]
    created: str
    updated: str
    sources: tuple[tuple[str, int, int], ...]


def describe(settings: Settings, name: str) -> IndexInfo:
    manifest = read_manifest(settings, name)
    generation = index_dir(settings, name) / manifest.generation
    return IndexInfo(
        name=manifest.name,
        files=len(manifest.files),
        chunks=manifest.chunk_count,
        embedder=manifest.embedder,
        backend=manifest.backend,
        dim=manifest.dim,
        chunk_size=manifest.chunking.size,
        chunk_overlap=manifest.chunking.overlap,
        search="exact" if manifest.chunk_count <= dense.FLAT_LIMIT else "ivf",
        disk_bytes=sum(p.stat().st_size for p in generation.rglob("*") if p.is_file()),
        root=manifest.root,
        patterns=tuple(manifest.patterns),
        created=manifest.created,
        updated=manifest.updated,
        sources=tuple((path, e.size, len(e.chunks)) for path, e in sorted(manifest.files.items())),
    )


def list_indexes(settings: Settings) -> list[IndexInfo]:
    return [describe(settings, name) for name in known_names(settings)]


# ---------------------------------------------------------------------------------------------- embedder


def embedder_for(manifest: Manifest, settings: Settings, embedder: str | None = None) -> EmbedderRef:
    """The model and backend that must embed queries and new chunks of this index: always its own.

    ``embedder`` (else ``settings.embedder``: ``--embedder`` or ``SAGE_EMBEDDER``) and
    ``settings.embed_backend`` (``SAGE_EMBED_BACKEND``) are the user's explicit choices; None means "whatever
    the index was built with". Asking for another model or backend than the index's is refused with the way
    out, since its vectors would not be comparable (another model) or not quite (int8 against PyTorch).
    """
    asked = embedder or settings.embedder
    backend, cache = manifest.backend, settings.embedder_cache
    if settings.embed_backend not in (None, backend):
        raise SageError(
            f"Index {manifest.name!r} was embedded with the {backend} backend, not {settings.embed_backend}: mixing "
            "them would rank its chunks slightly wrong. Unset SAGE_EMBED_BACKEND (an index always uses its own), "
            f"or re-embed it with the new one: `sage index add {manifest.name} PATH... --rebuild`."
        )
    if backend == ONNX and onnx_missing():
        raise SageError(
            f"Index {manifest.name!r} was embedded with ONNX Runtime, which is not installed here. "
            "Install it with `pip install onnxruntime onnx` (the rag extra has both), or re-embed the index with "
            f"PyTorch: `SAGE_EMBED_BACKEND=torch sage index add {manifest.name} PATH... --rebuild`."
        )
    ref = _own_model(manifest, asked, backend, cache)
    return replace(ref, export_format=manifest.export_format) if backend == ONNX else ref


def _own_model(manifest: Manifest, asked: str | None, backend: str, cache: Path) -> EmbedderRef:
    """The index's model (``asked`` must name that one), with ``backend``; see :func:`embedder_for`."""
    if asked is not None:
        ref = resolve_embedder(asked, backend, cache)
        if ref.id != manifest.embedder:
            raise SageError(
                f"Index {manifest.name!r} was built with the embedder {manifest.embedder!r}, not {ref.id!r}: its "
                "vectors cannot be compared with another model's. Query it without --embedder (and without "
                f"SAGE_EMBEDDER), or rebuild it with the new model: `sage index add {manifest.name} PATH... "
                f"--embedder {asked} --rebuild` (or `sage index rm {manifest.name}` then add)."
            )
        return ref
    if manifest.embedder == DEFAULT_EMBEDDER_ID:
        return resolve_embedder(None, backend, cache)
    path = Path(manifest.embedder)
    if not path.is_dir():
        raise SageError(
            f"Index {manifest.name!r} was built with the embedder at {path}, which no longer exists. Put the model "
            f"back there, or rebuild the index with another one: `sage index add {manifest.name} PATH... --rebuild`."
        )
    return resolve_embedder(str(path), backend, cache)


# ---------------------------------------------------------------------------------------------- generations


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


def search_text(chunk: Chunk) -> str:
    """What is embedded and keyword-indexed: the location (a heading path says what a chunk is about) + text."""
    return f"{chunk.location}\n{chunk.text}" if chunk.location else chunk.text


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


def open_generation(settings: Settings, name: str) -> Generation:
    """The generation serving an index now, shared across calls until the manifest is replaced."""
    folder = index_dir(settings, name)
    for _ in range(3):  # a writer may delete the generation we just read about: read the manifest again
        try:
            stat = (folder / MANIFEST).stat()
        except FileNotFoundError:
            _read_manifest(folder)  # raises NotFound naming the known indexes
            continue  # the manifest appeared meanwhile
        try:
            with _OPENING:  # two threads asking for a cold index load it once
                return _open_cached(folder, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            continue
    raise SageError(f"Index {name!r} is being rewritten too often to be read; try again in a moment.")


_OPENING = threading.Lock()


@functools.lru_cache(maxsize=4)
def _open_cached(folder: Path, _ino: int, _mtime_ns: int, _size: int) -> Generation:
    manifest = _read_manifest(folder)
    return Generation(folder / manifest.generation, manifest)
