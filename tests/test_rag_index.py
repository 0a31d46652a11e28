"""Real indexes with the bundled MiniLM embedder: retrieval quality, incremental updates, crash safety.

The model loads once per test process (``load_embedder`` is cached), so these tests share it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sage_magic import rag
from sage_magic.core.config import Settings
from sage_magic.core.errors import NotFound, SageError
from sage_magic.rag import embedder as embedder_module
from sage_magic.rag import lexical
from sage_magic.rag.encoders import TorchEncoder
from sage_magic.rag.model_ref import resolve_embedder
from sage_magic.rag.store import read_manifest

pytestmark = pytest.mark.rag

DOCS = Path(__file__).parent / "fixtures" / "rag" / "docs"
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = {
    "What Python version do I need, and how do I install the package?": "install.md",
    "How do I pick which graphics card the server runs on?": "gpu.md",
    "How much video memory does a 7B model need?": "gpu.md",
    "The model server is still not ready after waiting a long time": "troubleshooting.md",
    "My process was ended by the OOM killer": "troubleshooting.md",
    "How long does a server keep running after I close my notebook?": "keep-alive.md",
    "How do I re-embed only the files that changed?": "indexes.md",
    "What learning rate should I start with when training adapters?": "finetune.md",
}


def settings_for(home: Path, **changes: object) -> Settings:
    return Settings.from_env(environ={}, home=home).with_(**changes)


@pytest.fixture(scope="module", params=["onnx", "torch", "milvus"])
def built(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Settings:
    """One index of the docs corpus per embedding backend and store, shared by the read-only tests: retrieval
    quality must not depend on the backend (the int8 ONNX model puts the same files in the top 3) nor on the
    store ("milvus": ONNX vectors in a collection on a real Milvus Lite server, searched by Milvus itself)."""
    backend = "onnx" if request.param == "milvus" else request.param
    store = request.getfixturevalue("milvus_uri") if request.param == "milvus" else None
    settings = settings_for(tmp_path_factory.mktemp("home"), embed_backend=backend)
    report = rag.add(settings, "docs", [str(DOCS)], store_uri=store)
    assert report.files == 6 and report.chunks == report.chunks_embedded > 0
    info = rag.describe(settings, "docs")
    assert info.backend == backend and info.store == (store or "local")
    return settings


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A writable copy of the docs corpus."""
    return Path(shutil.copytree(DOCS, tmp_path / "docs"))


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of every batch the embedder encodes, to prove what was (not) re-embedded."""
    calls: list[int] = []
    original = embedder_module.Embedder.encode

    def counting(self: embedder_module.Embedder, texts: list[str]):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(embedder_module.Embedder, "encode", counting)
    return calls


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
@pytest.mark.parametrize("question, expected", QUESTIONS.items())
def test_the_file_holding_the_answer_is_in_the_top_3(built: Settings, mode: str, question: str, expected: str) -> None:
    hits = rag.search(built, "docs", question, top_k=3, mode=mode)
    assert expected in [h.source for h in hits], [(h.source, h.location) for h in hits]


def test_hits_carry_source_location_text_and_unique_ids(built: Settings) -> None:
    hits = rag.search(built, "docs", "CUDA_VISIBLE_DEVICES", top_k=5, mode="lexical")
    assert hits[0].source == "gpu.md" and hits[0].location == "Running on a GPU > Choosing a card"
    assert "CUDA_VISIBLE_DEVICES=1" in hits[0].text
    assert len({h.chunk_id for h in hits}) == len(hits)


@pytest.mark.parametrize("top_k", [0, 21, 2.5, True])
def test_top_k_bounds(built: Settings, top_k: object) -> None:
    with pytest.raises(SageError, match="top_k"):
        rag.search(built, "docs", "gpu", top_k=top_k)  # type: ignore[arg-type]


def test_unknown_index_lists_the_known_ones(built: Settings) -> None:
    with pytest.raises(NotFound, match=r"no index named 'nope'.*Known indexes: docs"):
        rag.search(built, "nope", "gpu")
    assert rag.index_exists(built, "docs") and not rag.index_exists(built, "nope")
    with pytest.raises(SageError, match="not a valid index name"):
        rag.index_exists(built, "../escape")


def test_another_embedder_is_refused_with_the_way_to_rebuild(built: Settings, tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(SageError, match=r"built with the embedder 'all-MiniLM-L6-v2'.*--rebuild.*sage index rm"):
        rag.search(built.with_(embedder=str(other)), "docs", "gpu")
    with pytest.raises(SageError, match="--rebuild"):
        rag.add(built, "docs", [str(DOCS)], embedder=str(other))


@pytest.fixture(params=["local", "milvus"])
def store(request: pytest.FixtureRequest) -> str | None:
    """Where a test's own index lives: local files (None), or the session's Milvus server."""
    return request.getfixturevalue("milvus_uri") if request.param == "milvus" else None


def test_update_reembeds_only_changed_files_and_forgets_deleted_ones(
    tmp_path: Path, corpus: Path, encoded: list[int], store: str | None
) -> None:
    settings = settings_for(tmp_path / "home")
    first = rag.add(settings, "docs", [str(corpus)], store_uri=store)
    assert sum(encoded) == first.chunks
    copied = dict((path, chunks) for path, _, chunks in rag.describe(settings, "docs").sources)["finetune.md"]

    encoded.clear()
    assert rag.update(settings, "docs").chunks_embedded == 0 and encoded == []  # nothing changed: no model work

    (corpus / "gpu.md").write_text("# Running on a GPU\n\nThe ZEPHYRIUM accelerator needs driver 999.\n")
    (corpus / "keep-alive.md").unlink()
    (corpus / "new.md").write_text("# Quantization\n\nAWQ and GPTQ shrink weights to four bits.\n")
    os.utime(corpus / "install.md")  # touched, same bytes: hashed, not re-embedded
    shutil.copy(corpus / "finetune.md", corpus / "tuning.md")  # known bytes under a new path: vectors reused
    report = rag.update(settings, "docs")
    assert report.changed == ("gpu.md",) and report.removed == ("keep-alive.md",)
    assert sorted(report.added) == ["new.md", "tuning.md"]
    assert sum(encoded) == report.chunks_embedded == 2  # one chunk each for gpu.md and new.md
    assert report.chunks == first.chunks - 3 - 3 + 2 + copied

    sources = {h.source for h in rag.search(settings, "docs", "keep-alive duration 5m SAGE_KEEP_ALIVE", top_k=10)}
    assert "keep-alive.md" not in sources
    assert rag.search(settings, "docs", "ZEPHYRIUM accelerator", top_k=1)[0].source == "gpu.md"
    assert rag.search(settings, "docs", "four-bit GPTQ quantization", top_k=1)[0].source == "new.md"
    tuning = rag.search(settings, "docs", "learning rate for training adapters", top_k=4)
    assert {"finetune.md", "tuning.md"} <= {h.source for h in tuning}  # the copy answers, as its own source
    every = rag.search(settings, "docs", "the", top_k=20, mode="lexical") + rag.search(
        settings, "docs", "model server GPU training", top_k=20, mode="dense")
    listed = {chunk_id for entry in read_manifest(settings, "docs").files.values() for chunk_id in entry.chunks}
    assert {h.chunk_id for h in every} <= listed  # the old chunks of gpu.md and keep-alive.md are gone
    if store is None:
        assert [p.name for p in (settings.index_root / "docs").iterdir() if p.name.startswith("gen-")] == ["gen-000002"]


def test_a_failed_update_leaves_the_old_index_serving(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path / "home")
    rag.add(settings, "docs", [str(corpus)])
    (corpus / "gpu.md").write_text("# GPU\n\nThe ZEPHYRIUM accelerator.\n")

    def broken(texts: list[str]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lexical, "build", broken)  # fails while the new generation is half written
    with pytest.raises(OSError):
        rag.update(settings, "docs")
    monkeypatch.undo()
    hits = rag.search(settings, "docs", "ZEPHYRIUM accelerator NVIDIA driver nvidia-smi", top_k=1, mode="lexical")
    assert "nvidia-smi" in hits[0].text  # still the old gpu.md
    assert rag.update(settings, "docs").changed == ("gpu.md",)  # and the next update cleans up and succeeds
    assert sorted(p.name for p in (settings.index_root / "docs").iterdir()) == [".lock", "gen-000002", "manifest.json"]


def test_an_update_killed_while_embedding_leaves_the_old_index_serving(tmp_path: Path, corpus: Path) -> None:
    settings = settings_for(tmp_path / "home")
    rag.add(settings, "docs", [str(corpus)])
    before = rag.search(settings, "docs", "nvidia-smi driver version", top_k=1)
    (corpus / "big.md").write_text("".join(f"# Part {i}\n\nThe ZEPHYRIUM fact number {i}.\n\n" for i in range(3000)))
    script = textwrap.dedent(
        f"""
        import sys
        from sage_magic import rag
        from sage_magic.core.config import Settings
        def show(event):
            print(event.phase, event.message, flush=True)
        rag.update(Settings.from_env(environ={{}}, home={str(settings.home)!r}), "docs", progress=show)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    for line in child.stdout:
        if "chunks embedded" in line:  # mid-embedding: at least one batch done, thousands to go
            child.send_signal(signal.SIGKILL)
            break
    assert child.wait(timeout=60) == -signal.SIGKILL

    assert rag.search(settings, "docs", "nvidia-smi driver version", top_k=1) == before
    assert "big.md" not in {h.source for h in rag.search(settings, "docs", "ZEPHYRIUM fact", top_k=5, mode="lexical")}
    assert rag.describe(settings, "docs").files == 6


def test_cli_smoke(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sage_magic.cli.main import main

    home = ["--home", str(tmp_path / "home")]
    assert main([*home, "index", "add", "docs", str(corpus), "--chunk-size", "400"]) == 0
    assert "6 files" in capsys.readouterr().out
    assert main([*home, "index", "list"]) == 0
    assert "docs" in capsys.readouterr().out
    assert main([*home, "index", "show", "docs"]) == 0
    assert "400 characters, 80 overlap" in capsys.readouterr().out
    assert main([*home, "index", "query", "docs", "pin the server to a graphics card", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] gpu.md (Running on a GPU > Choosing a card)") and "score" in out
    assert main([*home, "index", "query", "docs", "gpu", "--top-k", "99"]) == 2
    assert "top_k must be" in capsys.readouterr().err
    assert main([*home, "index", "update", "docs"]) == 0
    assert "0 chunks embedded" in capsys.readouterr().out
    assert main([*home, "index", "rm", "docs"]) == 0
    assert main([*home, "index", "show", "docs"]) == 2
    assert "There are no indexes yet" in capsys.readouterr().err


def test_searches_from_several_threads_at_once_agree_and_leave_thread_counts_alone(
    built: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A panel and a cell searching at once: same answers as one at a time, and the process's torch and FAISS
    thread counts unchanged afterwards (a thread that starts using them later still gets all the cores)."""
    import threading

    import faiss
    import torch

    def counts_in_a_new_thread() -> tuple[int, int]:
        seen: list[tuple[int, int]] = []
        thread = threading.Thread(target=lambda: seen.append((torch.get_num_threads(), faiss.omp_get_max_threads())))
        thread.start()
        thread.join()
        return seen[0]

    questions = list(QUESTIONS)
    alone = {q: rag.search(built, "docs", q, top_k=4) for q in questions}
    before = counts_in_a_new_thread()
    failures: list[str] = []

    def search(question: str) -> None:
        try:
            if rag.search(built, "docs", question, top_k=4) != alone[question]:
                failures.append(f"different hits for {question!r}")
        except Exception as error:  # noqa: BLE001 - any exception in a thread is the failure reported
            failures.append(repr(error))

    def run(*groups: list[str]) -> None:
        threads = [threading.Thread(target=lambda g=g: [search(q) for q in g]) for g in groups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(*[questions[k:] + questions[:k] for k in range(6)])  # six threads, every question each
    assert failures == [] and counts_in_a_new_thread() == before

    # A slow model makes two searches overlap for sure: the first waits inside the model until the second
    # arrives (or 2 s pass, when searches cannot overlap there), and the second then finishes last.
    ref = resolve_embedder(None, built.embed_backend, built.embedder_cache)  # type: ignore[arg-type]
    encoder = embedder_module.load_embedder(ref)._encoder
    model = encoder.model if isinstance(encoder, TorchEncoder) else encoder  # torch: inside its thread-count lock
    meeting, original = threading.Barrier(2, timeout=2), model.encode

    def slow(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        try:
            second = meeting.wait() == 1  # the index of the second to arrive
        except threading.BrokenBarrierError:
            second = False
        if second:
            threading.Event().wait(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode", slow)
    run(questions[:1], questions[1:2])
    assert failures == [] and counts_in_a_new_thread() == before
