"""What every index store shares: the chunk and manifest records, the index folder's files, and where an index
lives (local files, or a Milvus server named by a pointer file).

Both stores (``local``: FAISS + BM25 files; ``milvus``: a Milvus collection) import this module and nothing of
each other, and none of it imports numpy, FAISS or pymilvus: a kernel can tell which indexes exist, and where,
without loading any of them.

An index's folder, ``settings.index_root / NAME``, always holds ``manifest.json`` (what the index is: embedder,
chunking, files and their chunk ids). An index on a server also holds ``store.json``, the pointer: the server's
URI, the env var holding its token, and the collection. The manifest stays on this machine beside the pointer
because it describes this machine's files (paths, sizes, mtimes) that only this machine can rescan, and because
`sage index list/show` and `--index NAME` then need neither the network nor pymilvus.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ..core.errors import NotFound, SageError
from ..core.files import subfolders, write_json_atomic
from .chunker import ChunkSettings
from .model_ref import TORCH

if TYPE_CHECKING:
    import numpy as np

MANIFEST = "manifest.json"
POINTER = "store.json"
FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The env var a server's token is read from unless `--store-token-env` names another.
DEFAULT_TOKEN_ENV = "MILVUS_TOKEN"
MILVUS_PORT = 19530
#: Reciprocal rank fusion's constant (both stores fuse dense and lexical rankings with it in hybrid mode).
RRF_K = 60
#: Each ranking fused in hybrid mode is this much deeper than top_k, so a chunk ranked lower by one search
#: but high by the other can still surface.
HYBRID_DEPTH = 5


@dataclass(frozen=True)
class Chunk:
    """One searchable row: the text shown to people and models, and where it came from."""

    id: str
    source: str
    location: str
    text: str


def search_text(chunk: Chunk) -> str:
    """What is embedded and keyword-indexed: the location (a heading path says what a chunk is about) + text."""
    return f"{chunk.location}\n{chunk.text}" if chunk.location else chunk.text


@dataclass(frozen=True)
class Planned:
    """One chunk of an index's next state, in order: a copy of the chunk ``origin`` names (an old chunk id, whose
    text and vector are reused), or the ``origin``-th new chunk (whose vector is the ``origin``-th embedded)."""

    id: str
    source: str
    origin: str | int


@dataclass
class FileEntry:
    """What an index knows about one file: enough to tell, by stat then hash, whether it changed."""

    size: int
    mtime_ns: int
    sha256: str
    chunks: list[str]


@dataclass
class Manifest:
    """The description of an index; ``generation`` names the local folder that currently serves it."""

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
    export_format: int = 1  # with backend onnx: the export recipe (model_ref.EXPORT_FORMAT); older indexes: 1

    @property
    def chunk_count(self) -> int:
        return sum(len(entry.chunks) for entry in self.files.values())

    def chunk_ids(self) -> set[str]:
        return {chunk_id for entry in self.files.values() for chunk_id in entry.chunks}

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


# ---------------------------------------------------------------------------------------------- names, manifest


def check_name(name: str) -> str:
    """Index names become folder names: letters, digits, '-', '_' and '.', not starting with a dot."""
    if not _NAME.fullmatch(name or ""):
        raise SageError(
            f"{name!r} is not a valid index name. Use 1 to 64 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit (for example `docs` or `project-notes`)."
        )
    return name


def known(root: Path) -> list[str]:
    """Complete indexes under ``root``: folders with a manifest and a name `check_name` accepts."""
    return [name for name in subfolders(root, MANIFEST) if _NAME.fullmatch(name)]


def read_manifest_in(folder: Path) -> Manifest:
    """The manifest in an index folder, or NotFound naming the indexes that do exist."""
    path, name = folder / MANIFEST, folder.name
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        names = known(folder.parent)
        listing = f"Known indexes: {', '.join(names)}." if names else "There are no indexes yet."
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


# ---------------------------------------------------------------------------------------------- where an index lives


@dataclass(frozen=True)
class StoreRef:
    """A Milvus server and the collection holding one index there (``store.json``). No secret in it: the token
    is read from the environment variable ``token_env`` each time the server is asked."""

    uri: str  # what the user gave: milvus://HOST:PORT, http://..., https://...
    collection: str = ""
    token_env: str = DEFAULT_TOKEN_ENV

    @property
    def address(self) -> str:
        """The URI pymilvus connects to: milvus://HOST:PORT is http://HOST:PORT."""
        parts = urlsplit(self.uri)
        if parts.scheme == "milvus":
            return f"http://{parts.hostname}:{parts.port or MILVUS_PORT}"
        return self.uri


def parse_store(uri: str | None, token_env: str | None = None) -> StoreRef | None:
    """``--store`` / ``SAGE_INDEX_STORE``: None (or ``local``) for local files, else the server it names.

    Refused with the way out: a path (Milvus Lite's embedded mode, which one process at a time may open) and
    anything that is not milvus://, http:// or https://.
    """
    if uri is None or uri.strip() in ("", "local"):
        return None
    uri = uri.strip()
    parts = urlsplit(uri)
    if parts.scheme in ("milvus", "http", "https") and parts.hostname:
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        else:
            return StoreRef(uri=uri.rstrip("/"), token_env=token_env or DEFAULT_TOKEN_ENV)
    if parts.scheme in ("", "file") or uri.endswith(".db"):
        raise SageError(
            f"--store {uri!r} looks like a Milvus Lite data folder. Embedded Milvus Lite lets one process at a time "
            "open a folder, so a notebook kernel, its search helper and `sage index add` would lock each other "
            "out. Run it as a server once instead: `milvus-lite server --data-dir "
            f"{parts.path or uri} --host 127.0.0.1 --port 19530`, then use `--store milvus://127.0.0.1:19530`."
        )
    raise SageError(
        f"--store {uri!r} is not a store sage_magic knows. Leave it out (or say `local`) for files under SAGE_HOME, "
        "or name a Milvus server: `milvus://HOST:PORT`, `http://HOST:PORT`, or `https://HOST[:PORT]` with its "
        f"token in ${DEFAULT_TOKEN_ENV} (`--store-token-env VAR` for another variable)."
    )


def new_collection(name: str) -> str:
    """A collection name for index ``name``: Milvus allows [A-Za-z_][A-Za-z0-9_]*, so '-' and '.' become '_',
    and a random suffix keeps two machines' (or two users') indexes of the same name apart on one server."""
    return f"sage_{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{secrets.token_hex(4)}"


def read_pointer(folder: Path) -> StoreRef | None:
    """Where the index in ``folder`` lives: None for local files (no pointer), else its server."""
    try:
        data = json.loads((folder / POINTER).read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise SageError(
            f"The store pointer of index {folder.name!r} ({folder / POINTER}) is unreadable ({error}). Remove "
            f"the folder {folder} and add the index again (the collection on the server stays until you drop it)."
        ) from None
    return StoreRef(uri=data["uri"], collection=data["collection"], token_env=data.get("token_env", DEFAULT_TOKEN_ENV))


def write_pointer(folder: Path, ref: StoreRef) -> None:
    """Record, atomically, where the index in ``folder`` lives (before anything is written there)."""
    write_json_atomic(folder / POINTER, asdict(ref))


# ---------------------------------------------------------------------------------------------- the store interface


class Reader(Protocol):
    """An index opened for searching."""

    manifest: Manifest

    def search(self, mode: str, query: str, vector: np.ndarray | None, top_k: int) -> list[tuple[Chunk, float]]:
        """The ``top_k`` best (chunk, score) pairs, best first; ``vector`` is the embedded query (None for
        lexical). Scores: cosine similarity (dense), BM25 (lexical), reciprocal rank fusion (hybrid)."""
        ...


class IndexStore(Protocol):
    """Where an index's chunks and vectors live; the indexer, search and `sage index` are written against this."""

    kind: str  # what `sage index show/list` print: "local" or the server's URI

    def reader(self, folder: Path) -> Reader:
        """The index's current state, for searching (NotFound when there is none)."""
        ...

    def check(self, name: str) -> None:
        """Fail now if the store cannot take a write: called before embedding, which can take minutes."""
        ...

    def commit(self, folder: Path, manifest: Manifest, old: Manifest | None, rows: list[Planned],
               fresh: list[Chunk], embedded: np.ndarray) -> Manifest:
        """Make ``rows`` the index's content (``fresh[k]`` has the vector ``embedded[k]``) and publish
        ``manifest`` describing it, atomically for readers as far as the store allows; returns what was
        published."""
        ...

    def remove(self, folder: Path) -> None:
        """Delete the index's chunks and vectors (the folder itself is the caller's)."""
        ...

    def footprint(self, folder: Path, manifest: Manifest) -> tuple[str, int | None]:
        """How vectors are searched ("exact", "ivf", "hnsw") and the bytes on this disk (None: on a server)."""
        ...
