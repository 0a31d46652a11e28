"""Indexes on a Milvus server against the local store (FAISS + BM25 files), side by side in one run.

    python benchmarks/milvus_bench.py            # full: 100k chunks, 200 queries
    python benchmarks/milvus_bench.py --short    # CI: 10k chunks, 50 queries, < 2 min

The server is Milvus Lite's gRPC server (`milvus-lite server`, what a laptop runs), started here on a free
loopback port. Sections:
  1. scale (synthetic): the same chunks written into both stores through their common interface
     (``IndexStore.commit``): indexing chunks/s without the embedder; then per mode the query p50 of each
     store's own search (dense: HNSW on Milvus, exact or IVF locally; lexical: Milvus's BM25 function vs bm25s;
     hybrid: Milvus's RRF ranker vs ours) and recall@5 agreement (shared top-5 ids / 5) with the local store;
     dense also against exact search.
  2. real embedder, small corpus: `rag.add` of tests/fixtures/rag/docs into each store (chunks/s including
     MiniLM), and agreement of the top-5 on the test questions.

Synthetic vectors and texts, as in rag_bench.py (same generators): embedding 100k real chunks with MiniLM
on a 2-core CPU takes about an hour, so real paragraphs are embedded for the base vectors only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from rag_bench import percentiles, real_paragraphs, texts, tiled_vectors, timed  # noqa: E402

from sage_magic import rag  # noqa: E402
from sage_magic.core.config import Settings  # noqa: E402
from sage_magic.rag.chunker import ChunkSettings  # noqa: E402
from sage_magic.rag.embedder import load_embedder  # noqa: E402
from sage_magic.rag.local import LocalStore  # noqa: E402
from sage_magic.rag.milvus import MilvusStore  # noqa: E402
from sage_magic.rag.model_ref import ONNX, resolve_embedder  # noqa: E402
from sage_magic.rag.records import Chunk, Manifest, Planned, new_collection, parse_store  # noqa: E402
from tests.conftest import start_milvus_lite, stop_milvus_lite  # noqa: E402
from tests.test_rag_index import DOCS, QUESTIONS  # noqa: E402

MODES = ("dense", "lexical", "hybrid")


def agreement(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / max(len(b), 1)


def bench_scale(settings: Settings, uri: str, count: int, queries: int) -> None:
    print(f"\n== scale: {count:,} synthetic chunks (384-d vectors from real MiniLM embeddings, pseudo-word texts)")
    ref = resolve_embedder(None, ONNX, settings.embedder_cache)
    model = load_embedder(ref)
    base = model.encode(real_paragraphs(300))
    vectors = tiled_vectors(base, count)
    bodies = texts(count, words=60)
    fresh = [Chunk(f"f{i // 10}.md:0:{i % 10}", f"f{i // 10}.md", f"Part {i % 10}", body)
             for i, body in enumerate(bodies)]
    rows = [Planned(chunk.id, chunk.source, k) for k, chunk in enumerate(fresh)]
    manifest = Manifest("scale", ref.id, vectors.shape[1], ChunkSettings(), "/", ["/"], backend=ref.backend)
    server = replace(parse_store(uri), collection=new_collection("scale"))  # type: ignore[type-var]
    readers, rates = {}, {}
    for label, store in (("local", LocalStore()), ("milvus", MilvusStore(server))):
        folder = settings.index_root / f"scale-{label}"
        folder.mkdir(parents=True)
        seconds, _ = timed(store.commit, folder, manifest, None, rows, fresh, vectors)
        rates[label] = count / seconds
        readers[label] = store.reader(folder)
        print(f"  indexing {label:6s} {rates[label]:9,.0f} chunks/s ({seconds:.1f} s, embedding not included)")
    print(f"  milvus / local indexing rate: {rates['milvus'] / rates['local']:.2f}x")
    rng = np.random.default_rng(1)
    asked = tiled_vectors(base, queries)
    words = [" ".join(rng.choice(bodies[rng.integers(count)].rstrip(".").split(), size=4)) for _ in range(queries)]
    exact = [set(np.argsort(-(vectors @ q))[:5].tolist()) for q in asked]
    ids = {chunk.id: k for k, chunk in enumerate(fresh)}
    for mode in MODES:
        times: dict[str, list[float]] = {"local": [], "milvus": []}
        found: dict[str, list[list[str]]] = {"local": [], "milvus": []}
        for q, text in zip(asked, words):
            for label, reader in readers.items():
                seconds, hits = timed(reader.search, mode, text, q, 5)
                times[label].append(seconds)
                found[label].append([chunk.id for chunk, _ in hits])  # type: ignore[union-attr]
        agree = np.mean([agreement(m, lo) for m, lo in zip(found["milvus"], found["local"])])
        line = (f"  {mode:7s} local {percentiles(times['local'])} | milvus {percentiles(times['milvus'])} | "
                f"p50 ratio {np.median(times['milvus']) / np.median(times['local']):5.1f}x | recall@5 agreement "
                f"{agree:.3f}")
        if mode == "dense":
            recall = {label: np.mean([len({ids[i] for i in got} & truth) / 5
                                      for got, truth in zip(found[label], exact)]) for label in found}
            line += f" (vs exact: local {recall['local']:.3f}, milvus {recall['milvus']:.3f})"
        print(line)


def bench_real(settings: Settings, uri: str) -> None:
    print(f"\n== real embedder: {DOCS.relative_to(DOCS.parents[2])} with MiniLM (ONNX int8)")
    settings = settings.with_(embed_backend=ONNX)
    load_embedder(resolve_embedder(None, ONNX, settings.embedder_cache))  # loaded once, not charged to either
    for label, store in (("local", None), ("milvus", uri)):
        report = rag.add(settings, f"docs-{label}", [str(DOCS)], store_uri=store)
        print(f"  indexing {label:6s} {report.chunks / report.seconds:6.1f} chunks/s ({report.chunks} chunks, "
              f"{report.seconds:.2f} s with embedding)")
    for mode in MODES:
        agree = [agreement([h.chunk_id for h in rag.search(settings, "docs-milvus", q, top_k=5, mode=mode)],
                           [h.chunk_id for h in rag.search(settings, "docs-local", q, top_k=5, mode=mode)])
                 for q in QUESTIONS]  # one corpus, one embedder: the same chunk ids in both stores
        print(f"  {mode:7s} recall@5 agreement over {len(QUESTIONS)} questions: {np.mean(agree):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="10k chunks, 50 queries (< 2 min)")
    args = parser.parse_args()
    count, queries = (10_000, 50) if args.short else (100_000, 200)
    work = Path(tempfile.mkdtemp(prefix="milvus-bench-"))
    (work / "milvus").mkdir()
    process, uri = start_milvus_lite(work / "milvus")
    print(f"milvus_bench ({'--short' if args.short else 'full'}): Milvus Lite server at {uri}, local store "
          f"in {work}; {os.cpu_count()} CPUs")
    try:
        settings = Settings.from_env(environ={}, home=work / "home")
        bench_scale(settings, uri, count, queries)
        bench_real(settings, uri)
    finally:
        stop_milvus_lite(process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
