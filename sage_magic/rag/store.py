"""Indexes by name: where each lives, what it is, and the store that holds its chunks and vectors.

Every index has a folder ``settings.index_root / NAME`` holding its manifest (see records.py). Its chunks and
vectors live in one of two stores behind one interface (:class:`~.records.IndexStore`): local files (FAISS +
BM25, the default: local.py) or a Milvus collection (milvus.py), named by the folder's pointer file. The
indexer, search and `sage index` ask :func:`store_for` and never care which.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.config import Settings
from ..core.errors import SageError
from .model_ref import DEFAULT_EMBEDDER_ID, ONNX, EmbedderRef, onnx_missing, resolve_embedder
from .records import (
    IndexStore,
    Manifest,
    Reader,
    StoreRef,
    check_name,
    known,
    parse_store,
    read_manifest_in,
    read_pointer,
)


def index_dir(settings: Settings, name: str) -> Path:
    return settings.index_root / check_name(name)


def index_exists(settings: Settings, name: str) -> bool:
    """Whether a complete index of that name exists (a first build killed midway does not count)."""
    return (index_dir(settings, name) / "manifest.json").is_file()


def known_names(settings: Settings) -> list[str]:
    return known(settings.index_root)


def read_manifest(settings: Settings, name: str) -> Manifest:
    """The manifest of an existing index, or NotFound naming the indexes that do exist."""
    return read_manifest_in(index_dir(settings, name))


# ---------------------------------------------------------------------------------------------- stores


def open_store(ref: StoreRef | None) -> IndexStore:
    """The store for a pointer: local files for None, else the Milvus server it names. Opening a store loads
    nothing heavy; FAISS or pymilvus load on its first search or write, in the process doing it (never in a
    kernel, which searches through its helper process and builds through a `sage` child)."""
    if ref is None:
        from .local import LocalStore

        return LocalStore()
    from .milvus import MilvusStore

    return MilvusStore(ref)


def store_for(settings: Settings, name: str) -> IndexStore:
    """The store holding index ``name`` now, as its folder's pointer says."""
    return open_store(read_pointer(index_dir(settings, name)))


def open_reader(settings: Settings, name: str) -> Reader:
    """Index ``name`` opened for searching (NotFound, listing the known ones, when there is none)."""
    folder = index_dir(settings, name)
    return open_store(read_pointer(folder)).reader(folder)


def check_store(settings: Settings, name: str, uri: str | None) -> None:
    """Refuse ``--store URI`` on an existing index that lives elsewhere (its pointer decides, not the flag)."""
    if uri is None:
        return
    asked = parse_store(uri)
    read_manifest(settings, name)  # NotFound first
    lives = store_label(read_pointer(index_dir(settings, name)))
    if store_label(asked) != lives:
        raise SageError(
            f"Index {name!r} lives in {lives}, not {store_label(asked)}. Leave --store out: an existing index is "
            "always found where it was built."
        )


def store_label(ref: StoreRef | None) -> str:
    """Where an index lives, as people read it: "local" or its server's URI."""
    return "local" if ref is None else ref.uri


def remove_index(settings: Settings, name: str) -> None:
    """Delete an index: its chunks and vectors in its store, then its folder (the documents are not touched)."""
    folder = index_dir(settings, name)
    if not (folder / "manifest.json").is_file() and read_pointer(folder) is None:
        read_manifest_in(folder)  # NotFound with the known names
    store_for(settings, name).remove(folder)
    shutil.rmtree(folder)


@dataclass(frozen=True)
class IndexInfo:
    """What `sage index list/show` print: an index's settings, size and files (source, bytes, chunks)."""

    name: str
    store: str
    files: int
    chunks: int
    embedder: str
    backend: str
    dim: int
    chunk_size: int
    chunk_overlap: int
    search: str
    disk_bytes: int | None  # None: the vectors are on a server
    root: str
    patterns: tuple[str, ...]
    created: str
    updated: str
    sources: tuple[tuple[str, int, int], ...]


def describe(settings: Settings, name: str) -> IndexInfo:
    """An index as its manifest describes it: no store is opened, so a server index needs no network."""
    manifest = read_manifest(settings, name)
    folder = index_dir(settings, name)
    store = open_store(read_pointer(folder))
    search, size = store.footprint(folder, manifest)
    return IndexInfo(
        name=manifest.name,
        store=store.kind,
        files=len(manifest.files),
        chunks=manifest.chunk_count,
        embedder=manifest.embedder,
        backend=manifest.backend,
        dim=manifest.dim,
        chunk_size=manifest.chunking.size,
        chunk_overlap=manifest.chunking.overlap,
        search=search,
        disk_bytes=size,
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
