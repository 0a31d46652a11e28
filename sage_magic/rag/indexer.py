"""Building and refreshing an index: only files whose bytes changed are read, chunked and embedded.

A file is unchanged when its size and mtime match the manifest (no read at all); otherwise its SHA-256
decides, and content already indexed under any path (a touched, renamed or copied file) reuses its
vectors. Everything else in a new generation is copied from the old one, so updating one file of a
10,000-file corpus costs one file's embedding plus rewriting the search structures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import Settings
from ..core.errors import SageError
from ..core.files import LockBusy, exclusive, utc_now
from ..core.progress import Progress, ProgressCallback, silent
from . import loaders, store
from .chunker import ChunkSettings, chunk_spans
from .embedder import Embedder, load_for_build
from .model_ref import ONNX, EmbedderRef, resolve_embedder
from .records import (
    Chunk,
    FileEntry,
    IndexStore,
    Manifest,
    Planned,
    StoreRef,
    new_collection,
    parse_store,
    read_pointer,
    search_text,
    write_manifest,
    write_pointer,
)

if TYPE_CHECKING:
    import numpy as np

#: Chunks embedded per call: large enough to keep the CPU busy, small enough for a lively progress bar.
EMBED_BATCH = 64


@dataclass(frozen=True)
class UpdateReport:
    """What an add or update did; ``chunks_embedded`` counts model work (0 when nothing changed)."""

    name: str
    files: int
    chunks: int
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    chunks_embedded: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for people: totals, then what moved."""
        line = (
            f"Index {self.name!r}: {self.files} files, {self.chunks} chunks "
            f"({len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed; "
            f"{self.chunks_embedded} chunks embedded in {self.seconds:.1f} s)."
        )
        for source, why in self.skipped:
            line += f"\nSkipped {source}: {why}"
        for note in self.notes:
            line += f"\nNote: {note}"
        return line


def add(
    settings: Settings,
    name: str,
    paths: Sequence[str],
    *,
    embedder: str | None = None,
    chunking: ChunkSettings | None = None,
    rebuild: bool = False,
    progress: ProgressCallback = silent,
    store_uri: str | None = None,
    token_env: str | None = None,
) -> UpdateReport:
    """Create index ``name`` from folders, files or globs, or add paths to it (then refresh it).

    ``embedder`` and ``chunking`` default to the index's own (or settings.embedder and 800/160 for a new
    one); changing either on an existing index needs ``rebuild=True``, which re-embeds everything. So does
    another backend (settings.embed_backend); a new index gets ONNX wherever ONNX Runtime is installed.
    ``store_uri`` (else settings.index_store) says where a new index lives: local files, or a Milvus server
    whose token is in the env var ``token_env``; an existing index stays where it is.
    """
    folder = store.index_dir(settings, name)
    asked = parse_store(store_uri if store_uri is not None else settings.index_store, token_env)
    patterns = [_absolute(p) for p in paths]
    for pattern, path in zip(patterns, paths):
        if not loaders.expand(pattern)[1]:
            why = "nothing readable there" if os.path.exists(pattern) else "no such file or folder"
            raise SageError(
                f"{path!r} names no document ({why}). Give folders, files or globs (quote globs: 'docs/**/*.md'); "
                "Markdown, reST, text, Python, notebooks, HTML and PDF are read, hidden and build folders skipped."
            )
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(folder, name):
            old = store.read_manifest(settings, name) if store.index_exists(settings, name) else None
            where = _place(folder, name, old, asked, explicit=store_uri is not None)
            if old is not None and not rebuild:
                ref = store.embedder_for(old, settings, embedder)
                if chunking is not None and chunking != old.chunking:
                    raise SageError(
                        f"Index {name!r} cuts text into {old.chunking.size}-character chunks with "
                        f"{old.chunking.overlap} overlap; changing that re-embeds everything. Add --rebuild to do so."
                    )
                merged = list(dict.fromkeys(old.patterns + patterns))
                return _refresh(folder, where, replace(old, patterns=merged), old, ref, progress)
            backend = settings.embed_backend or ONNX  # on "auto", load_for_build falls back to torch with a note
            ref = resolve_embedder(embedder or settings.embedder, backend, settings.embedder_cache)
            fresh = Manifest(
                name=name,
                embedder=ref.id,
                dim=0,
                chunking=chunking or ChunkSettings(),
                root="",
                patterns=list(dict.fromkeys(patterns)),
                generation=old.generation if old else "",
                created=utc_now(),
                backend=ref.backend,
                export_format=ref.export_format,
            )
            return _refresh(folder, where, fresh, None, ref, progress, fall_back=settings.embed_backend is None)
    finally:
        if not store.index_exists(settings, name):  # a failed first build leaves nothing behind
            with contextlib.suppress(SageError):  # (its collection on a server, when it can be reached)
                store.store_for(settings, name).remove(folder)
            shutil.rmtree(folder, ignore_errors=True)


def _place(folder: Path, name: str, old: Manifest | None, asked: StoreRef | None, explicit: bool) -> IndexStore:
    """The store index ``name`` is (or is now to be) in. A new index goes where it was asked, and on a server
    its pointer is written first, so even a killed first build leaves its collection findable; an existing
    one stays where it is, and an explicit ``--store`` naming another place is refused."""
    current = read_pointer(folder)
    if old is not None:
        if explicit and (asked.uri if asked else "local") != (current.uri if current else "local"):
            raise SageError(
                f"Index {name!r} lives in {current.uri if current else 'local files'}, not "
                f"{asked.uri if asked else 'local files'}. To move it, remove it (`sage index rm {name}`) and add "
                "it again with the new --store."
            )
        return store.open_store(current)
    if asked is not None:
        same = current is not None and current.uri == asked.uri
        current = replace(asked, collection=current.collection if same else new_collection(name))
        write_pointer(folder, current)
        return store.open_store(current)
    if current is not None:
        (folder / "store.json").unlink()
    return store.open_store(None)


def update(settings: Settings, name: str, *, progress: ProgressCallback = silent) -> UpdateReport:
    """Re-read an index's paths: embed new and changed files, forget deleted ones, switch atomically."""
    folder = store.index_dir(settings, name)
    store.read_manifest(settings, name)  # NotFound before a lock file is created for an unknown name
    with _locked(folder, name):
        old = store.read_manifest(settings, name)  # again, under the lock: another writer may have finished
        where = store.store_for(settings, name)
        return _refresh(folder, where, old, old, store.embedder_for(old, settings), progress)


def _refresh(
    folder: Path,
    where: IndexStore,
    manifest: Manifest,
    old: Manifest | None,
    ref: EmbedderRef,
    progress: ProgressCallback,
    fall_back: bool = False,
) -> UpdateReport:
    """Bring ``manifest``'s files up to date, reusing ``old``'s vectors, and publish it in ``where``.

    ``fall_back``: a new index on the automatic backend may be embedded with PyTorch when ONNX cannot run
    (see embedder.load_for_build); the manifest records what did embed it."""
    import numpy as np

    started = time.perf_counter()
    root, files = loaders.discover(manifest.patterns)
    plan = _Plan(manifest.chunking, old, same_root=old is not None and old.root == str(root))
    ticker = _Ticker(progress)
    for number, path in enumerate(files, start=1):
        plan.visit(path, path.relative_to(root).as_posix())
        ticker("scan", f"{number}/{len(files)} files read", number / len(files))
    old_files = old.files if old else {}
    removed = tuple(sorted(set(old_files) - set(plan.entries)))
    added = tuple(rel for rel in plan.entries if rel not in old_files)
    changed = tuple(rel for rel, e in plan.entries.items() if rel in old_files and e.sha256 != old_files[rel].sha256)
    manifest = replace(manifest, root=str(root), files=plan.entries, updated=utc_now())
    notes: tuple[str, ...] = ()
    if old is not None and old.root == manifest.root and not (added or changed or removed):
        write_manifest(folder, manifest)  # only stats or patterns moved: the stored chunks still hold
    else:
        embedded = None
        if plan.fresh or old is None:
            where.check(manifest.name)  # an unreachable server fails now, not after minutes of embedding
            ticker("embed", f"loading the embedding model {ref.id} ({ref.backend})", None, force=True)
            model, note = load_for_build(ref, fall_back)
            notes = (note,) if note else ()
            manifest = replace(manifest, backend=model.ref.backend)
            embedded = _embed([search_text(chunk) for chunk in plan.fresh], model, ticker)
        dim = embedded.shape[1] if embedded is not None else manifest.dim
        if old is not None and dim != old.dim:
            raise SageError(
                f"The embedder {ref.id} now makes {dim}-dimensional vectors, but index {old.name!r} holds "
                f"{old.dim}-dimensional ones: the model files changed. Rebuild with `sage index add {old.name} "
                "PATH... --rebuild`."
            )
        if embedded is None:
            embedded = np.empty((0, dim), dtype=np.float32)
        ticker("save", f"writing {len(plan.rows)} chunks", None, force=True)
        manifest = where.commit(folder, replace(manifest, dim=dim), old, plan.rows, plan.fresh, embedded)
    return UpdateReport(
        name=manifest.name,
        files=len(manifest.files),
        chunks=manifest.chunk_count,
        added=added,
        changed=changed,
        removed=removed,
        skipped=tuple(plan.skipped),
        chunks_embedded=len(plan.fresh),
        seconds=time.perf_counter() - started,
        notes=notes,
    )


@dataclass
class _Plan:
    """The chunks of the next state, in file order (``rows``): each a copy of an old chunk or a new one to embed
    (``fresh``, in the order they are embedded)."""

    chunking: ChunkSettings
    old: Manifest | None
    same_root: bool
    entries: dict[str, FileEntry] = field(default_factory=dict)
    rows: list[Planned] = field(default_factory=list)
    fresh: list[Chunk] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        files = self.old.files if self.old else {}
        self._by_hash = {entry.sha256: entry for entry in files.values()}
        self._by_path = files if self.same_root else {}

    def visit(self, path: Path, rel: str) -> None:
        """Plan one file: trust an unchanged stat, else hash it and reuse or re-chunk by content."""
        stat = path.stat()
        known = self._by_path.get(rel)
        if known and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            sha, data = known.sha256, None
        else:
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
        ids = self._reuse(rel, sha) if sha in self._by_hash else self._chunk(path, rel, sha, data)
        if ids is not None:
            self.entries[rel] = FileEntry(stat.st_size, stat.st_mtime_ns, sha, ids)

    def _reuse(self, rel: str, sha: str) -> list[str]:
        ids = []
        for k, old_id in enumerate(self._by_hash[sha].chunks):
            ids.append(_chunk_id(rel, sha, k))
            self.rows.append(Planned(ids[-1], rel, old_id))
        return ids

    def _chunk(self, path: Path, rel: str, sha: str, data: bytes | None) -> list[str] | None:
        try:
            sections = loaders.load(path, path.read_bytes() if data is None else data)
        except SageError as error:
            self.skipped.append((rel, str(error)))
            return None
        ids = []
        for section in sections:
            for start, end in chunk_spans(section.text, self.chunking):
                if section.text[start:end].strip():
                    ids.append(_chunk_id(rel, sha, len(ids)))
                    self.rows.append(Planned(ids[-1], rel, len(self.fresh)))
                    self.fresh.append(Chunk(ids[-1], rel, section.location, section.text[start:end]))
        return ids


def _embed(texts: list[str], model: Embedder, ticker: _Ticker) -> np.ndarray:
    """Embed in batches, reporting chunks done and chunks per second."""
    import numpy as np

    started, parts, done = time.perf_counter(), [], 0
    for batch in _batches(texts, EMBED_BATCH):
        parts.append(model.encode(batch))
        done += len(batch)
        rate = done / max(time.perf_counter() - started, 1e-9)
        ticker("embed", f"{done}/{len(texts)} chunks embedded, {rate:.0f} chunks/s", done / len(texts))
    return np.concatenate(parts) if parts else np.empty((0, model.dim), dtype=np.float32)


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _chunk_id(rel: str, sha: str, k: int) -> str:
    """Unique in an index (one path), and new whenever the file's content changes."""
    return f"{rel}:{sha[:8]}:{k}"


class _Ticker:
    """Forwards progress at most ten times a second (10,000 files must not mean 10,000 redraws)."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.progress = progress
        self.last = 0.0

    def __call__(self, phase: str, message: str, fraction: float | None, force: bool = False) -> None:
        now = time.monotonic()
        if force or fraction == 1.0 or now - self.last >= 0.1:
            self.last = now
            self.progress(Progress(phase, message, fraction))


@contextlib.contextmanager
def _locked(folder: Path, name: str) -> Iterator[None]:
    """Exclusive right to write one index; a second writer is told to wait instead of corrupting it.

    The OS releases the lock when its holder dies, so a killed update never blocks the next one.
    """
    try:
        with exclusive(folder / ".lock", wait=False):
            yield
    except LockBusy:
        raise SageError(
            f"Another process is writing index {name!r} right now. Wait for it to finish, then run the command "
            "again; the index keeps answering with its current content meanwhile."
        ) from None


def _absolute(pattern: str) -> str:
    return os.path.abspath(os.path.expanduser(pattern))
