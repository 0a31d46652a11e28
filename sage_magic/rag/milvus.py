"""The index store on a Milvus server: one collection per index, the same pymilvus code for Milvus Lite's
server, Standalone and Distributed.

A collection's rows are chunks: ``chunk_id`` (the primary key, as in the local store), ``source``,
``location``, ``body`` (what is embedded and keyword-indexed: location + text) and ``vector`` (ours, from the
index's embedder in this process); Milvus derives ``sparse`` from ``body`` with its BM25 function. Dense
search is HNSW over cosine, lexical Milvus's own BM25, hybrid both fused by its RRF ranker: no second index
is kept here. The collection's ``sage.meta`` property records the embedder, backend and dimension that built
it, checked against the local manifest before any search or write.

Writes are idempotent (upserts by chunk id, then deleting every id the new manifest does not list), so an
update killed midway is finished by the next one; readers may see a changed file's old and new chunks side by
side for the moment between the two steps. Every read asks for Strong consistency, so a search right after
`sage index add` sees what it wrote. pymilvus is imported on first use, never at import of this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import NotFound, SageError
from .records import (
    HYBRID_DEPTH,
    RRF_K,
    Chunk,
    Manifest,
    Planned,
    StoreRef,
    read_manifest_in,
    search_text,
    write_manifest,
)

if TYPE_CHECKING:
    import numpy as np
    from pymilvus import MilvusClient

#: Bytes per insert RPC: Milvus refuses more than 64 MB in one; a quarter keeps memory and retries small.
BATCH_BYTES = 16 * 1024 * 1024
#: Chunk ids per query or delete RPC (each id becomes part of a literal filter expression).
IDS_PER_CALL = 1000
#: Longest VARCHAR Milvus stores (bytes).
MAX_VARCHAR = 65535
META = "sage.meta"
CONSISTENCY = "Strong"
#: HNSW graph: 16 links per node and a wide build beam keep recall@5 against exact search near 1 at 100k.
HNSW_BUILD = {"M": 16, "efConstruction": 200}
CONNECT_TIMEOUT = 10.0
_FIELDS = ["source", "location", "body"]


class MilvusStore:
    """An index's chunks and vectors in a collection on a Milvus server."""

    def __init__(self, ref: StoreRef) -> None:
        self.ref = ref
        self.kind = ref.uri

    def reader(self, folder: Path) -> MilvusReader:
        manifest = read_manifest_in(folder)
        with _talking(self.ref, manifest.name, "search"):
            client = _client(self.ref)
            _check_meta(client, self.ref, manifest)
        return MilvusReader(client, self.ref, manifest)

    def check(self, name: str) -> None:
        """pymilvus is here and the server answers (the client connects when made)."""
        with _talking(self.ref, name, "store chunks"):
            _client(self.ref)

    def commit(self, folder: Path, manifest: Manifest, old: Manifest | None, rows: list[Planned],
               fresh: list[Chunk], embedded: np.ndarray) -> Manifest:
        name, collection = manifest.name, self.ref.collection
        dim = int(embedded.shape[1])
        with _talking(self.ref, name, "store chunks"):
            client = _client(self.ref)
            if old is None:  # a first build or --rebuild: start from an empty collection
                if client.has_collection(collection):
                    client.drop_collection(collection)
                _create(client, collection, replace(manifest, dim=dim))
            else:
                _check_meta(client, self.ref, old)
            copies = [p for p in rows if isinstance(p.origin, str) and p.origin != p.id]
            old_rows = _fetch(client, collection, [str(p.origin) for p in copies])
            batch: list[dict[str, Any]] = []
            size = 0
            for planned in rows:
                if isinstance(planned.origin, int):
                    chunk = fresh[planned.origin]
                    row = _row(planned.id, planned.source, chunk.location, search_text(chunk), embedded[planned.origin])
                elif planned.origin != planned.id:
                    row = {**old_rows[planned.origin], "chunk_id": planned.id, "source": planned.source}
                else:
                    continue  # already there under this id
                batch.append(row)
                size += _row_bytes(row)
                if size >= BATCH_BYTES:
                    client.upsert(collection, batch)
                    batch, size = [], 0
            if batch:
                client.upsert(collection, batch)
            keep = {planned.id for planned in rows}
            stale = [chunk_id for chunk_id in _all_ids(client, collection) if chunk_id not in keep]
            for start in range(0, len(stale), IDS_PER_CALL):
                client.delete(collection, ids=stale[start : start + IDS_PER_CALL])
            # Seal what was written so that Milvus indexes it: Milvus Lite searches unsealed rows by brute force
            # (measured at 10k chunks: ~600 ms per query before, ~40 ms after; milvus_bench.py).
            client.flush(collection)
        manifest = replace(manifest, dim=dim, generation="")
        write_manifest(folder, manifest)
        return manifest

    def remove(self, folder: Path) -> None:
        with _talking(self.ref, folder.name, "drop the index", forget_hint=folder):
            client = _client(self.ref)
            if client.has_collection(self.ref.collection):
                client.drop_collection(self.ref.collection)

    def footprint(self, folder: Path, manifest: Manifest) -> tuple[str, int | None]:
        return "hnsw", None


class MilvusReader:
    """One index's collection, searched by Milvus: HNSW (dense), its BM25 function (lexical), RRF (hybrid)."""

    def __init__(self, client: MilvusClient, ref: StoreRef, manifest: Manifest) -> None:
        self.client, self.ref, self.manifest = client, ref, manifest

    def search(self, mode: str, query: str, vector: np.ndarray | None, top_k: int) -> list[tuple[Chunk, float]]:
        from pymilvus import AnnSearchRequest, RRFRanker

        depth = top_k * HYBRID_DEPTH if mode == "hybrid" else top_k
        dense = {"data": [vector.tolist()] if vector is not None else None, "anns_field": "vector",
                 "param": {"metric_type": "COSINE", "params": {"ef": max(64, depth)}}, "limit": depth}
        lexical = {"data": [query], "anns_field": "sparse", "param": {"metric_type": "BM25"}, "limit": depth}
        collection = self.ref.collection
        with _talking(self.ref, self.manifest.name, "search"):
            if mode == "hybrid":
                found = self.client.hybrid_search(
                    collection, [AnnSearchRequest(**dense), AnnSearchRequest(**lexical)], ranker=RRFRanker(RRF_K),
                    limit=top_k, output_fields=_FIELDS, consistency_level=CONSISTENCY)
            else:
                asked = dense if mode == "dense" else lexical
                found = self.client.search(
                    collection, data=asked["data"], anns_field=asked["anns_field"], limit=top_k,
                    search_params=asked["param"], output_fields=_FIELDS, consistency_level=CONSISTENCY)
        # Milvus Lite reports BM25 scores negated (best is most negative); a server, positive: the size is the score
        score = abs if mode == "lexical" else float
        return [(_chunk(hit["chunk_id"], hit["entity"]), float(score(hit["distance"]))) for hit in found[0]]


# ---------------------------------------------------------------------------------------------- rows


def _row(chunk_id: str, source: str, location: str, body: str, vector: np.ndarray) -> dict[str, Any]:
    for field, value in (("chunk_id", chunk_id), ("source", source), ("body", body)):
        if len(value.encode()) > MAX_VARCHAR:
            raise SageError(
                f"A chunk's {field} of {source!r} is {len(value.encode())} bytes, more than the {MAX_VARCHAR} a "
                "Milvus text field holds. Use a smaller --chunk-size (the default 800 characters always fits), "
                "or shorten the file's path."
            )
    return {"chunk_id": chunk_id, "source": source, "location": location, "body": body,
            "vector": [float(x) for x in vector]}


def _row_bytes(row: dict[str, Any]) -> int:
    return 4 * len(row["vector"]) + sum(len(row[k].encode()) for k in ("chunk_id", "source", "location", "body"))


def _chunk(chunk_id: str, entity: dict[str, Any]) -> Chunk:
    location, body = entity["location"], entity["body"]
    return Chunk(chunk_id, entity["source"], location, body[len(location) + 1:] if location else body)


def _fetch(client: MilvusClient, collection: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored rows (vector included) of ``ids``, to copy under new ids without re-embedding."""
    rows: dict[str, dict[str, Any]] = {}
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), IDS_PER_CALL):
        found = client.query(collection, ids=unique[start : start + IDS_PER_CALL],
                             output_fields=["chunk_id", *_FIELDS, "vector"], consistency_level=CONSISTENCY)
        rows.update({row["chunk_id"]: dict(row) for row in found})
    missing = [chunk_id for chunk_id in unique if chunk_id not in rows]
    if missing:
        raise SageError(
            f"The collection {collection!r} lacks {len(missing)} chunks its manifest lists (for example "
            f"{missing[0]!r}): it was changed outside sage_magic. Rebuild the index with `sage index add NAME "
            "PATH... --rebuild`."
        )
    return rows


def _all_ids(client: MilvusClient, collection: str) -> Iterator[str]:
    """Every chunk id in the collection, in pages (a killed update may have left rows no manifest lists)."""
    iterator = client.query_iterator(collection, batch_size=IDS_PER_CALL, filter='chunk_id != ""',
                                     output_fields=["chunk_id"], consistency_level=CONSISTENCY)
    try:
        while page := iterator.next():
            yield from (row["chunk_id"] for row in page)
    finally:
        iterator.close()


# ---------------------------------------------------------------------------------------------- collections


def _create(client: MilvusClient, collection: str, manifest: Manifest) -> None:
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=MAX_VARCHAR)
    schema.add_field("source", DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field("location", DataType.VARCHAR, max_length=MAX_VARCHAR)
    schema.add_field("body", DataType.VARCHAR, max_length=MAX_VARCHAR, enable_analyzer=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=manifest.dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(Function(name="body_bm25", function_type=FunctionType.BM25,
                                 input_field_names=["body"], output_field_names=["sparse"]))
    indexes = client.prepare_index_params()
    indexes.add_index("vector", index_type="HNSW", metric_type="COSINE", params=HNSW_BUILD)
    indexes.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(collection, schema=schema, index_params=indexes, consistency_level=CONSISTENCY,
                             properties={META: json.dumps(_meta(manifest))})


def _meta(manifest: Manifest) -> dict[str, Any]:
    return {"index": manifest.name, "embedder": manifest.embedder, "backend": manifest.backend, "dim": manifest.dim}


_CHECKED: set[tuple[str, str, str]] = set()


def _check_meta(client: MilvusClient, ref: StoreRef, manifest: Manifest) -> None:
    """Refuse a collection built by another embedder than the manifest says (rebuilt from another machine)."""
    expected = _meta(manifest)
    key = (ref.address, ref.collection, json.dumps(expected))
    if key in _CHECKED:
        return
    properties = client.describe_collection(ref.collection).get("properties") or {}
    try:
        recorded = json.loads(properties.get(META, ""))
    except ValueError:
        recorded = None
    if recorded != expected:
        raise SageError(
            f"Index {manifest.name!r}'s collection {ref.collection!r} on {ref.uri} was built with "
            f"{recorded or 'no record of its embedder'}, but this machine's manifest says {expected}: its vectors "
            f"cannot be compared with this embedder's. Rebuild it: `sage index add {manifest.name} PATH... "
            "--rebuild`."
        )
    _CHECKED.add(key)


# ---------------------------------------------------------------------------------------------- connecting


_CLIENTS: dict[tuple[str, str], MilvusClient] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(ref: StoreRef) -> MilvusClient:
    """One client per server and token in this process (pymilvus clients are thread-safe and reconnect)."""
    token = os.environ.get(ref.token_env, "")
    with _CLIENTS_LOCK:
        client = _CLIENTS.get((ref.address, token))
        if client is None:
            client = _CLIENTS[(ref.address, token)] = _pymilvus().MilvusClient(
                uri=ref.address, token=token, timeout=CONNECT_TIMEOUT)
        return client


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise SageError(
            "This index lives on a Milvus server, and talking to one needs pymilvus, which is not installed "
            "here. Install it with `pip install 'sage-magic[milvus]'` (pymilvus and Milvus Lite), in the "
            "environment that runs `sage` and the search helper (SAGE_PYTHON)."
        ) from None
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its RPC errors become our one paragraph instead
    return pymilvus


@contextlib.contextmanager
def _talking(ref: StoreRef, name: str, action: str, forget_hint: Path | None = None) -> Iterator[None]:
    """Turn what pymilvus raises into one paragraph that says what to do next."""
    try:
        yield
    except SageError:
        raise
    except Exception as error:
        from pymilvus.exceptions import MilvusException

        if not isinstance(error, MilvusException):
            raise
        raise _explained(ref, name, action, error, forget_hint) from None


def _grpc_status(error: BaseException) -> tuple[str, str]:
    """The gRPC status (its name and the server's words) under a pymilvus error. pymilvus reports every failed
    connect as "Fail connecting to server ... or server unavailable", a refused token too; the server's own
    answer (UNAUTHENTICATED, "auth check failure, ...") is only in the gRPC error it chains."""
    seen: BaseException | None = error
    visited: set[int] = set()  # pymilvus raises some errors from themselves: a chain can loop
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        code, details = getattr(seen, "code", None), getattr(seen, "details", None)
        if callable(code) and callable(details):
            return str(getattr(code(), "name", "")), str(details() or "")
        seen = seen.__cause__
    return "", ""


def _explained(ref: StoreRef, name: str, action: str, error: Any, forget_hint: Path | None) -> SageError:
    message = str(getattr(error, "message", "") or error)
    status, said = _grpc_status(error)
    lowered = message.lower()
    forget = (f" To forget the index on this machine anyway, delete the folder {forget_hint}."
              if forget_hint else "")
    # A refusal comes as the gRPC status under a connect error, or as words in a Milvus error of its own.
    if status == "PERMISSION_DENIED" or (not status and any(word in lowered for word in ("permission", "denied"))):
        return SageError(
            f"The Milvus server at {ref.uri} let the user of ${ref.token_env} in but not {action} for index "
            f"{name!r} (it said: {said or message}). Ask whoever runs Milvus to grant that user read and write on "
            f"the collection {ref.collection!r}, or use another user's token.{forget}"
        )
    if status == "UNAUTHENTICATED" or (not status and any(word in lowered for word in ("auth", "credential", "token"))):
        given = (f"refused the token in ${ref.token_env}" if os.environ.get(ref.token_env)
                 else f"asks for credentials and ${ref.token_env} is not set")
        return SageError(
            f"The Milvus server at {ref.uri} {given} (index {name!r}; it said: {said or message}). Put a valid "
            f"token (`user:password`, or an API key) in ${ref.token_env} in the environment that runs `sage` "
            "and the notebook, never in the notebook itself; `--store-token-env VAR` names another "
            f"variable.{forget}"
        )
    if "fail connecting" in lowered or "unavailable" in lowered or "deadline" in lowered:
        return SageError(
            f"Cannot reach the Milvus server at {ref.uri} (index {name!r}) to {action}. Start it (on a laptop: "
            "`milvus-lite server --data-dir DIR --host 127.0.0.1 --port PORT`; on a cluster, ask whoever runs "
            f"Milvus Standalone or Distributed), or check the address and the network.{forget}"
        )
    if "not exist" in lowered or "not found" in lowered or "can't find" in lowered:
        return NotFound(
            f"Index {name!r} points at the collection {ref.collection!r} on {ref.uri}, which is not there (it was "
            f"dropped, or the server lost its data). Run `sage index rm {name}`, then `sage index add {name} "
            f"PATH... --store {ref.uri}` to build it again."
        )
    return SageError(f"The Milvus server at {ref.uri} could not {action} for index {name!r}: {message}.{forget}")
