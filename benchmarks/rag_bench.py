"""Benchmarks of the document-index engine (sage_magic.rag), printed next to their goals.

    python benchmarks/rag_bench.py            # full: 1M vectors, 100k-chunk index, 10,000-file corpus
    python benchmarks/rag_bench.py --short    # CI: same measurements on smaller sizes, < 60 s

Sections:
  1. indexing throughput: `rag.add` with the real MiniLM embedder on files of one full-size chunk, with each
     backend (torch, onnx int8) side by side with the floor (sentence-transformers' own encode), alternating;
     and one query's embedding with each backend;
  2. incremental update: a corpus of 1-chunk Markdown files is indexed (stand-in vectors, see below), one
     file is changed and `rag.update` is timed with the real embedder (goal <= 2 s for 10,000 files);
  3. exact vs IVF search alone on synthetic 384-d vectors: latency per query and recall@5 against exact
     search (goal <= 5 ms at recall >= 0.95), plus exact-search latency by size (how FLAT_LIMIT was chosen);
  4. end-to-end query latency (embed the query + search) on an index of synthetic chunks, dense / lexical /
     hybrid, IVF vs exact; and hybrid through the RAG helper process (`rag.SearchService`, what a notebook
     kernel uses) next to in-process (goal p50 <= 25 ms at 100k chunks).

Synthetic vectors: real MiniLM embeddings of a few hundred synthetic texts are blended pairwise at random
weights, with Gaussian noise added, and re-normalized (see ``tiled_vectors``): they fill the region real
embeddings occupy, unlike uniform random vectors (no structure at all: the worst case for any approximate
index). Embedding 100k+ texts with MiniLM on a 2-core CPU would take hours, so only the base texts are
embedded for real.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from sage_magic import rag
from sage_magic.core.config import Settings
from sage_magic.rag import dense, indexer, local, records, store
from sage_magic.rag.chunker import ChunkSettings
from sage_magic.rag.embedder import load_embedder
from sage_magic.rag.model_ref import ONNX, TORCH, onnx_missing, resolve_embedder

RNG = np.random.default_rng(0)
SYLLABLES = [a + b for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar", "en", "is", "on")]
WORDS = np.array(sorted({"".join(RNG.choice(SYLLABLES, size=RNG.integers(2, 4))) for _ in range(8000)}))


def real_paragraphs(count: int) -> list[str]:
    """Paragraphs of English prose from the standard library's docstrings and comments: varied topics,
    available offline, so the base vectors have the spread of real document embeddings."""
    import sysconfig

    found: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for block in path.read_text(errors="replace").split("\n\n"):
            words = block.replace('"""', " ").replace("#", " ").split()
            if 15 <= len(words) <= 120 and sum(w.isalpha() for w in words) > 0.7 * len(words):
                found.append(" ".join(words))
                if len(found) == count:
                    return found
    return found


def texts(count: int, words: int = 60) -> list[str]:
    """Random sentences over a fixed pseudo-word vocabulary (Zipf-like frequencies, as in prose)."""
    weights = 1.0 / np.arange(1, len(WORDS) + 1)
    picks = RNG.choice(len(WORDS), size=(count, words), p=weights / weights.sum())
    return [" ".join(WORDS[row]) + "." for row in picks]


def tiled_vectors(base: np.ndarray, count: int, noise: float = 0.5) -> np.ndarray:
    """``count`` unit vectors spread through the space of the real ``base`` embeddings.

    Each is a random blend w*a + (1-w)*b of two base rows plus Gaussian noise of norm ~``noise``: a
    continuum along and between real embeddings, not a few tight clusters an IVF index would find trivially.
    """
    dim = base.shape[1]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        w = RNG.random((n, 1), dtype=np.float32)
        block = w * base[RNG.integers(0, len(base), size=n)] + (1 - w) * base[RNG.integers(0, len(base), size=n)]
        block += RNG.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p95 {np.percentile(ms, 95):6.2f} ms"


def timed(fn, *args) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def section(title: str) -> None:
    print(f"\n== {title}")


def write_corpus(files: int, words: int) -> Path:
    """A folder of ``files`` one-chunk Markdown files spread over 50 sub-folders."""
    folder = Path(tempfile.mkdtemp(prefix="rag-corpus-"))
    for i, body in enumerate(texts(files, words=words)):
        sub = folder / f"part{i % 50:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:05d}.md").write_text(f"# Document {i}\n\n{body}\n")
    return folder


#: Issue #16's figure for `rag.add` before this benchmark measured it side by side: 8.1 chunks/s, 0.58x the
#: floor (14.0 chunks/s) on the same machine. Goal 2 asks 3x that, i.e. 1.74x the floor of the same run.
TODAY_VS_FLOOR = 0.58


def bench_throughput(settings: Settings, files: int, rounds: int, queries: list[str]) -> None:
    """Indexing throughput and query embedding, each backend side by side with the floor, alternating.

    The floor is sentence-transformers' own ``encode`` (batch size 32, model loaded) on exactly the texts
    `rag.add` embeds; ours is all of `rag.add` (read, chunk, embed, BM25, write) on files of one ~780-character
    chunk (~250 MiniLM tokens). Every round runs floor, torch and onnx back to back, so machine load hits all
    three alike; medians over the rounds are printed."""
    from sentence_transformers import SentenceTransformer

    section(f"indexing throughput: {files} files of one ~780-character chunk each, real MiniLM, "
            f"{rounds} alternating rounds")
    backends = [TORCH] + ([] if onnx_missing() else [ONNX])
    if ONNX not in backends:
        print("  onnx: ONNX Runtime is not installed, so only the PyTorch backend is measured")
    floor_model = SentenceTransformer(str(resolve_embedder(None).path), local_files_only=True, device="cpu")
    folder, warm = write_corpus(files, words=110), write_corpus(1, words=110)
    for backend in backends:  # model load, the ONNX export on first use, imports: paid once, shown apart
        seconds, _ = timed(lambda: rag.add(settings.with_(embed_backend=backend), f"warm-{backend}", [str(warm)]))
        print(f"  {backend:5s} first build in this process: {seconds:.1f} s (model load"
              f"{', ONNX export if not cached' if backend == ONNX else ''}, imports)")
    first = rag.add(settings.with_(embed_backend=TORCH), "texts", [str(folder)])
    texts = [records.search_text(c) for c in local.open_generation(store.index_dir(settings, "texts")).chunks]
    rates: dict[str, list[float]] = {"floor": [], **{b: [] for b in backends}}
    for round_ in range(rounds):
        seconds, _ = timed(lambda: floor_model.encode(texts, batch_size=32, normalize_embeddings=True))
        rates["floor"].append(len(texts) / seconds)
        for backend in backends:
            seconds, report = timed(lambda: rag.add(settings.with_(embed_backend=backend), f"{backend}-{round_}",
                                                    [str(folder)]))
            rates[backend].append(report.chunks / seconds)
    floor = float(np.median(rates["floor"]))
    print(f"  floor  {floor:6.1f} chunks/s  sentence-transformers encode, batch size 32 ({first.chunks} chunks)")
    torch_rate = float(np.median(rates[TORCH]))
    print(f"  torch  {torch_rate:6.1f} chunks/s  rag.add = {torch_rate / floor:.2f}x the floor   goal >= 0.95x: "
          f"{'met' if torch_rate >= 0.95 * floor else 'MISSED'}")
    if ONNX in backends:
        onnx_rate = float(np.median(rates[ONNX]))
        today = TODAY_VS_FLOOR * floor
        print(f"  onnx   {onnx_rate:6.1f} chunks/s  rag.add = {onnx_rate / floor:.2f}x the floor, "
              f"{onnx_rate / torch_rate:.2f}x torch, {onnx_rate / today:.1f}x today's ({TODAY_VS_FLOOR}x the floor "
              f"= {today:.1f} chunks/s)   goal >= 3x today's: {'met' if onnx_rate >= 3 * today else 'MISSED'}")
    print(f"  10,000 chunks take {10_000 / torch_rate / 60:.0f} min with torch"
          + (f", {10_000 / onnx_rate / 60:.0f} min with onnx" if ONNX in backends else ""))
    times: dict[str, list[float]] = {b: [] for b in backends}
    models = {b: load_embedder(resolve_embedder(None, b, settings.embedder_cache)) for b in backends}
    for query in queries:  # one short text, as `rag.search` embeds it
        for backend in backends:
            times[backend].append(timed(models[backend].encode, [query])[0])
    for backend in backends:
        ratio = np.median(times[TORCH]) / np.median(times[backend])
        goal = f"   goal >= 2x faster: {'met' if ratio >= 2 else 'MISSED'}" if backend == ONNX else ""
        print(f"  {backend:5s} query embedding  {percentiles(times[backend])}  {ratio:.1f}x torch{goal}")
    shutil.rmtree(folder)
    shutil.rmtree(warm)


def bench_corpus(settings: Settings, base: np.ndarray, files: int) -> None:
    """No-op update and one-file update on a corpus of ``files`` small Markdown files.

    The initial build runs the real pipeline except the model: vectors come from ``tiled_vectors`` (the
    build's cost is measured by bench_throughput). The updates timed afterwards embed with the real model.
    """
    section(f"incremental update: corpus of {files:,} Markdown files, one chunk each")
    folder = write_corpus(files, words=30)
    real_embed = indexer._embed
    indexer._embed = lambda texts, model, ticker: tiled_vectors(base, len(texts))
    try:
        seconds, report = timed(lambda: rag.add(settings, "corpus", [str(folder)]))
    finally:
        indexer._embed = real_embed
    print(f"build      {report.chunks:,} chunks in {seconds:.1f} s with stand-in vectors (real pipeline, no model)")
    seconds, report = timed(lambda: rag.update(settings, "corpus"))
    print(f"no-op      update in {seconds:.2f} s (stat only, no file read, no model call)")
    changed = folder / "part07" / "doc00007.md"
    changed.write_text("# Document 7\n\nThe ZEPHYRIUM accelerator changed this file.\n")
    seconds, report = timed(lambda: rag.update(settings, "corpus"))
    assert report.changed and report.chunks_embedded == 1, report
    print(f"1 changed  update in {seconds:.2f} s, {report.chunks_embedded} chunk re-embedded    "
          f"goal <= 2 s: {'met' if seconds <= 2 else 'MISSED'} (model already loaded; a fresh CLI process adds "
          "the model load measured above)")
    hit = rag.search(settings, "corpus", "ZEPHYRIUM accelerator", top_k=1)[0]
    assert hit.source == "part07/doc00007.md", hit
    shutil.rmtree(folder)


def bench_vectors(base: np.ndarray, count: int, queries: int) -> None:
    """Exact vs IVF search alone, recall@5 against exact, and the exact-latency curve behind FLAT_LIMIT."""
    section(f"vector search alone: {count:,} synthetic 384-d vectors, {queries} queries, 1 thread per query")
    vectors = tiled_vectors(base, count)
    probes = tiled_vectors(base, queries)
    seconds, ivf = timed(dense.build, vectors)
    print(f"IVF build  nlist {ivf.nlist}, {seconds:.1f} s (k-means on {min(count, ivf.nlist * 64):,} points + assign)")
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(probes, 5)  # batched ground truth
    flat_times = [timed(dense.search, exact, q, 5)[0] for q in probes]
    print(f"exact      {percentiles(flat_times)}")
    default = ivf.nprobe
    for nprobe in sorted({8, 16, 32, 64, default}):
        ivf.nprobe = nprobe
        runs = [timed(dense.search, ivf, q, 5) for q in probes]
        recall = np.mean([len({r for r, _ in res} & set(truth[i])) / 5 for i, (_, res) in enumerate(runs)])
        p50 = np.percentile([t for t, _ in runs], 50) * 1000
        goal = "met" if p50 <= 5 and recall >= 0.95 else "missed"
        mark = "  <- default" if nprobe == default else ""
        print(f"IVF nprobe {nprobe:3d}  {percentiles([t for t, _ in runs])}  recall@5 {recall:.3f}  "
              f"{np.median(flat_times) * 1000 / p50:5.1f}x faster than exact   goal <= 5 ms, >= 0.95: {goal}{mark}")
    ivf.nprobe = default
    worst = min(count, 200_000)
    noise = RNG.standard_normal((worst + queries, vectors.shape[1]), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    unstructured, exact = dense.build(noise[:worst]), faiss.IndexFlatIP(vectors.shape[1])
    exact.add(noise[:worst])
    _, truth = exact.search(noise[worst:], 5)
    recall = np.mean([len({r for r, _ in dense.search(unstructured, q, 5)} & set(truth[i])) / 5
                      for i, q in enumerate(noise[worst:])])
    print(f"worst case: {worst:,} uniform random vectors (no structure), default nprobe {unstructured.nprobe}: "
          f"recall@5 {recall:.3f} -- real embeddings sit between this and the figures above")
    print(f"exact latency by size (FLAT_LIMIT = {dense.FLAT_LIMIT:,}):")
    for size in (10_000, 25_000, 50_000, 100_000):
        if size > count:
            break
        part = faiss.IndexFlatIP(vectors.shape[1])
        part.add(vectors[:size])
        print(f"  {size:>7,} vectors  {percentiles([timed(dense.search, part, q, 5)[0] for q in probes[:100]])}")


def bench_queries(settings: Settings, base_texts: list[str], base: np.ndarray, count: int, queries: int) -> None:
    """End-to-end rag.search latency on a ``count``-chunk index, IVF (as built) vs forced exact search."""
    section(f"end-to-end query (embed + search): {count:,}-chunk index, {queries} queries")
    bodies = base_texts + texts(count - len(base_texts), words=30)
    chunks = [records.Chunk(f"f{i // 10}.md:0:{i % 10}", f"f{i // 10}.md", f"Part {i % 10}", b)
              for i, b in enumerate(bodies)]
    vectors = np.concatenate([base, tiled_vectors(base, count - len(base))])
    files: dict[str, list[str]] = {}
    for chunk in chunks:  # the manifest lists every chunk, as a built index's does (search counts them)
        files.setdefault(chunk.source, []).append(chunk.id)
    asked = texts(queries, words=8)
    backend = TORCH if onnx_missing() else ONNX  # what `sage index add` would use
    ref = resolve_embedder(None, backend, settings.embedder_cache)
    print(f"backend {ref.backend} (the default here)")
    for label, limit in (("ivf", dense.FLAT_LIMIT), ("exact", count)):
        name = f"q-{label}-{limit}"
        folder = settings.index_root / name
        folder.mkdir(parents=True)
        saved, dense.FLAT_LIMIT = dense.FLAT_LIMIT, limit
        try:
            seconds, generation = timed(local.write_generation, folder, 1, chunks, vectors)
        finally:
            dense.FLAT_LIMIT = saved
        manifest = records.Manifest(name, ref.id, vectors.shape[1], ChunkSettings(), "/", ["/"], generation,
                                    {f: records.FileEntry(0, 0, "", ids) for f, ids in files.items()}, "", "",
                                    ref.backend, ref.export_format)
        records.write_manifest(folder, manifest)
        opened, _ = timed(local.open_generation, folder)
        print(f"{label:5s} write {seconds:.1f} s, first open {opened:.1f} s")
        embed = [timed(load_embedder(ref).encode, [q])[0] for q in asked]
        print(f"  query embedding alone       {percentiles(embed)}")
        for mode in rag.MODES:
            runs = [timed(rag.search, settings, name, q, 4, mode)[0] for q in asked]
            print(f"  {mode:8s} rag.search        {percentiles(runs)}")
        if label == "ivf":  # the index as `sage index add` builds it
            bench_service(settings, name, asked, count)


def bench_service(settings: Settings, name: str, asked: list[str], count: int) -> None:
    """Query p50 through the RAG helper process (what a notebook kernel uses) against in-process.

    Each query is timed both ways back to back, so a change in machine load hits both figures alike; the
    lexical mode (no embedding) shows the helper's own cost most clearly."""
    service = rag.SearchService(settings)
    try:
        seconds, _ = timed(service.warm, name)
        print(f"  helper process start + model load + index open {seconds:.1f} s (once per kernel)")
        for mode in ("hybrid", "lexical"):
            local, remote = [], []
            for q in asked:
                local.append(timed(rag.search, settings, name, q, 4, mode)[0])
                remote.append(timed(service.search, name, q, 4, mode)[0])
            p50, cost = np.percentile(remote, 50) * 1000, np.median(np.subtract(remote, local)) * 1000
            goal = (f"goal p50 <= 25 ms at 100k chunks (here {count:,}): {'met' if p50 <= 25 else 'MISSED'}"
                    if mode == "hybrid" else "")
            print(f"  {mode:8s} in-process        {percentiles(local)}")
            print(f"  {mode:8s} SearchService     {percentiles(remote)}   helper cost (median of pairs) "
                  f"{cost:+.2f} ms  {goal}")
    finally:
        service.close()


SECTIONS = ("throughput", "corpus", "vectors", "queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="smaller sizes for CI (< 60 s)")
    parser.add_argument("--only", choices=SECTIONS, action="append", default=None, metavar="SECTION",
                        help=f"run only these sections, repeatable ({', '.join(SECTIONS)}); e.g. --only queries "
                             "measures the 100k-chunk query figures in a few minutes, without the 1M-vector part")
    args = parser.parse_args()
    only = set(args.only or SECTIONS)
    sizes = (
        dict(files=1_000, vectors=100_000, chunks=60_000, queries=100, base=128, throughput=48, rounds=3)
        if args.short
        else dict(files=10_000, vectors=1_000_000, chunks=100_000, queries=200, base=1_000, throughput=256,
                 rounds=3)
    )
    started = time.perf_counter()
    print(f"sage_magic.rag benchmark ({'--short: reduced sizes' if args.short else 'full'}); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.short:
        print("  --short uses 1,000 files (goal stated for 10,000), 100k vectors (goal stated for 1M) and a "
              "60k-chunk index (stated for 100k)")
    home = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    settings = Settings.from_env(environ={}, home=home)
    try:
        seconds, model = timed(load_embedder, resolve_embedder(None))
        print(f"model load {seconds:.1f} s (once per process; paid by `sage index update` in a fresh CLI process)")
        base_texts = real_paragraphs(sizes["base"])
        seconds, base = timed(model.encode, base_texts)
        print(f"embedded   {len(base_texts)} base texts for synthetic vectors in {seconds:.1f} s")
        if "throughput" in only:
            bench_throughput(settings, sizes["throughput"], sizes["rounds"], texts(sizes["queries"], words=8))
        if "corpus" in only:
            bench_corpus(settings, base, sizes["files"])
        if "vectors" in only:
            bench_vectors(base, sizes["vectors"], sizes["queries"])
        if "queries" in only:
            bench_queries(settings, base_texts, base, sizes["chunks"], sizes["queries"])
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
