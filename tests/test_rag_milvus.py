"""Indexes on a Milvus server (the session's real Milvus Lite server, see conftest.milvus_uri): what a user does
with `sage index ... --store`, finding the index again by name alone, and the one-paragraph errors.

Retrieval quality and incremental updates on Milvus are the same tests as for local files (test_rag_index.py,
parametrized over the store).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sage_magic import rag
from sage_magic.cli.main import main
from sage_magic.core.errors import NotFound, SageError
from sage_magic.rag.records import read_pointer
from sage_magic.rag.store import index_dir

from .test_rag_index import DOCS, REPO, settings_for

pytestmark = pytest.mark.rag

QUESTION = "How do I pick which graphics card the server runs on?"


def collections(uri: str) -> list[str]:
    from pymilvus import MilvusClient

    return MilvusClient(uri.replace("milvus://", "http://")).list_collections()


def sage(home: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`sage ...` as a user runs it, in its own process."""
    environ = {**os.environ, "SAGE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    environ.pop("SAGE_INDEX_STORE", None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "sage_magic.cli.main", *argv], capture_output=True, text=True,
                          env=environ, cwd=REPO, timeout=300)


def test_an_index_added_with_store_is_found_by_name_alone_and_removed_from_the_server(
    tmp_path: Path, milvus_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path / "home")]
    assert main([*home, "index", "add", "team-docs", str(DOCS), "--store", milvus_uri]) == 0
    assert "6 files" in capsys.readouterr().out
    collection = read_pointer(tmp_path / "home" / "indexes" / "team-docs").collection  # type: ignore[union-attr]
    assert collection.startswith("sage_team_docs_") and collection in collections(milvus_uri)

    assert main([*home, "index", "show", "team-docs"]) == 0
    out = capsys.readouterr().out
    assert f"store      {milvus_uri}" in out and "on a Milvus server" in out and "hnsw vector search" in out
    assert main([*home, "index", "list", "--store", milvus_uri]) == 0
    assert "team-docs" in capsys.readouterr().out
    assert main([*home, "index", "list", "--store", "local"]) == 0
    assert "No indexes in store local" in capsys.readouterr().out

    # another process, no --store: the pointer beside the manifest says where the index is
    found = sage(tmp_path / "home", "index", "query", "team-docs", QUESTION, "--top-k", "2", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert [h["source"] for h in hits] == ["gpu.md", "gpu.md"] and hits[0]["location"].endswith("Choosing a card")
    assert set(hits[0]) == {"source", "location", "score", "text", "chunk_id"}

    assert main([*home, "index", "rm", "team-docs"]) == 0
    assert collection not in collections(milvus_uri) and not (tmp_path / "home" / "indexes" / "team-docs").exists()


def test_sage_index_store_is_the_default_for_new_indexes_only(tmp_path: Path, milvus_uri: str) -> None:
    home = tmp_path / "home"
    local = sage(home, "index", "add", "mine", str(DOCS / "gpu.md"))
    assert local.returncode == 0, local.stderr
    added = sage(home, "index", "add", "shared", str(DOCS / "gpu.md"), env={"SAGE_INDEX_STORE": milvus_uri})
    assert added.returncode == 0, added.stderr
    again = sage(home, "index", "add", "mine", str(DOCS / "install.md"), env={"SAGE_INDEX_STORE": milvus_uri})
    assert again.returncode == 0, again.stderr
    listing = json.loads(sage(home, "index", "list", "--json").stdout)
    assert {i["name"]: i["store"] for i in listing} == {"mine": "local", "shared": milvus_uri}
    moved = sage(home, "index", "add", "mine", str(DOCS), "--store", milvus_uri)
    assert moved.returncode == 2 and "lives in local files" in moved.stderr and "sage index rm mine" in moved.stderr
    assert "Traceback" not in moved.stderr


def test_a_search_helper_finds_the_index_and_the_asking_process_never_imports_pymilvus(
    tmp_path: Path, milvus_uri: str
) -> None:
    """What `%%sage --index NAME` does in a kernel: search through the helper process, by name only."""
    settings = settings_for(tmp_path / "home")
    rag.add(settings, "docs", [str(DOCS)], store_uri=milvus_uri)
    expected = rag.search(settings, "docs", QUESTION, top_k=3)
    code = (
        "import json, sys\n"
        "from sage_magic.core.config import Settings\n"
        "from sage_magic.rag.service import SearchService\n"
        "from sage_magic.chat.session import Session\n"
        f"settings = Settings.from_env(environ={{}}, home={str(tmp_path / 'home')!r})\n"
        "Session(settings)._check_index('docs')\n"
        "from sage_magic.rag import list_indexes\n"
        f"assert [(i.name, i.store) for i in list_indexes(settings)] == [('docs', {milvus_uri!r})]\n"
        f"hits = SearchService(settings).search('docs', {QUESTION!r}, 3)\n"
        "heavy = [m for m in ('pymilvus', 'faiss', 'torch', 'onnxruntime') if m in sys.modules]\n"
        "print(json.dumps({'hits': [h.chunk_id for h in hits], 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer == {"hits": [h.chunk_id for h in expected], "heavy": []}


def test_a_collection_rebuilt_with_another_embedder_elsewhere_is_refused(tmp_path: Path, milvus_uri: str) -> None:
    from pymilvus import MilvusClient

    settings = settings_for(tmp_path / "home")
    document = tmp_path / "gpu.md"
    document.write_bytes((DOCS / "gpu.md").read_bytes())
    rag.add(settings, "docs", [str(document)], store_uri=milvus_uri)
    ref = read_pointer(index_dir(settings, "docs"))
    assert ref is not None
    meta = {"index": "docs", "embedder": "/models/other", "backend": "torch", "dim": 768}
    MilvusClient(ref.address).alter_collection_properties(ref.collection, properties={"sage.meta": json.dumps(meta)})
    with pytest.raises(SageError, match=r"built with .*/models/other.*--rebuild"):
        rag.search(settings, "docs", "gpu")
    document.write_text("# GPUs\n\nNew text to embed.\n")
    with pytest.raises(SageError, match=r"built with .*/models/other"):
        rag.update(settings, "docs")  # nothing written into another model's collection


def test_a_collection_dropped_behind_our_back_says_how_to_rebuild(tmp_path: Path, milvus_uri: str) -> None:
    from pymilvus import MilvusClient

    settings = settings_for(tmp_path / "home")
    rag.add(settings, "docs", [str(DOCS / "gpu.md")], store_uri=milvus_uri)
    ref = read_pointer(index_dir(settings, "docs"))
    assert ref is not None
    MilvusClient(ref.address).drop_collection(ref.collection)
    with pytest.raises(NotFound, match=rf"{ref.collection}.*not there.*sage index rm docs.*--store {milvus_uri}"):
        rag.search(settings, "docs", "gpu")
    rag.remove_index(settings, "docs")  # rm still works: nothing left to drop
    assert not rag.index_exists(settings, "docs")


def test_an_unreachable_server_is_one_paragraph_and_a_failed_first_build_leaves_nothing(tmp_path: Path) -> None:
    from sage_magic.serving.launch import port_free

    port = next(p for p in range(29530, 29600) if port_free(p))
    home = tmp_path / "home"
    done = sage(home, "index", "add", "docs", str(DOCS), "--store", f"milvus://127.0.0.1:{port}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"Cannot reach the Milvus server at milvus://127.0.0.1:{port}" in done.stderr
    assert "milvus-lite server --data-dir" in done.stderr
    assert "embed:" not in done.stderr  # said before minutes of embedding, not after
    assert not (home / "indexes" / "docs").exists()


@contextlib.contextmanager
def refusing_milvus(status: str, words: str) -> Iterator[str]:
    """A fake Milvus that answers every call with gRPC ``status`` and ``words``, as an auth-enabled Milvus's proxy
    answers a wrong or missing token (UNAUTHENTICATED) or a user without rights (PERMISSION_DENIED): Milvus Lite
    has no authentication, so a real server here cannot be made to show these faults. Yields its
    ``milvus://127.0.0.1:PORT``."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'sage-magic[milvus]')")
    import grpc  # pymilvus's own transport

    class Refuse(grpc.GenericRpcHandler):
        def service(self, handler_call_details: Any) -> Any:
            def refuse(request: bytes, context: Any) -> None:
                context.abort(getattr(grpc.StatusCode, status), words)

            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((Refuse(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"milvus://127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.mark.parametrize("status, words, token, says", [
    ("UNAUTHENTICATED", "auth check failure, please check api key is correct", "not-the-right-token-4f2a",
     "refused the token in $MILVUS_TOKEN"),
    ("UNAUTHENTICATED", "auth check failure, please check api key is correct", "",
     "asks for credentials and $MILVUS_TOKEN is not set"),
    ("PERMISSION_DENIED", "PrivilegeInsert: permission deny to alice", "alice:secret-pw-4f2a",
     "let the user of $MILVUS_TOKEN in but not store chunks"),
])
def test_a_refused_token_or_user_is_one_paragraph_saying_which_and_nothing_is_embedded(
        tmp_path: Path, status: str, words: str, token: str, says: str) -> None:
    home = tmp_path / "home"
    with refusing_milvus(status, words) as uri:
        done = sage(home, "index", "add", "docs", str(DOCS), "--store", uri, env={"MILVUS_TOKEN": token})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = " ".join(done.stderr.split())
    assert f"The Milvus server at {uri} {says}" in said and words in said and "Cannot reach" not in said
    if status == "UNAUTHENTICATED":
        assert "--store-token-env VAR" in said  # how to name another variable
    if token:
        assert token not in done.stderr + done.stdout  # the secret is named by its variable, never shown
    assert "embed:" not in done.stderr  # said before any embedding
    assert not (home / "indexes" / "docs").exists()


def test_an_index_whose_server_is_gone_says_so_and_rm_tells_how_to_forget_it(tmp_path: Path, milvus_uri: str) -> None:
    from sage_magic.rag.records import write_pointer

    settings = settings_for(tmp_path / "home")
    rag.add(settings, "docs", [str(DOCS / "gpu.md")], store_uri=milvus_uri)
    folder = index_dir(settings, "docs")
    ref = read_pointer(folder)
    assert ref is not None
    write_pointer(folder, type(ref)(uri="milvus://127.0.0.1:1", collection=ref.collection))  # the server moved
    with pytest.raises(SageError, match="Cannot reach the Milvus server at milvus://127.0.0.1:1"):
        rag.search(settings, "docs", "gpu")
    with pytest.raises(SageError, match=rf"delete the folder {folder}"):
        rag.remove_index(settings, "docs")
    assert rag.index_exists(settings, "docs")  # not half-removed


@pytest.mark.parametrize("uri, says", [
    ("./team.db", "one process at a time"),
    ("/data/milvus", "milvus-lite server --data-dir /data/milvus"),
    ("redis://host:6379", "not a store sage_magic knows"),
])
def test_store_uris_that_cannot_work_are_refused_before_anything_starts(tmp_path: Path, uri: str, says: str) -> None:
    with pytest.raises(SageError, match=says):
        rag.add(settings_for(tmp_path / "home"), "docs", [str(DOCS)], store_uri=uri)
    assert not (tmp_path / "home" / "indexes" / "docs").exists()


def test_without_pymilvus_the_error_says_which_extra_to_install(tmp_path: Path, milvus_uri: str) -> None:
    """pymilvus hidden by a stand-in package that fails to import, as in an environment without the extra."""
    shadow = tmp_path / "shadow" / "pymilvus"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named pymilvus')\n")
    done = sage(tmp_path / "home", "index", "add", "docs", str(DOCS), "--store", milvus_uri,
                env={"PYTHONPATH": os.pathsep.join([str(shadow.parent), str(REPO)])})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pip install 'sage-magic[milvus]'" in done.stderr
