"""The two embedding backends: the int8 ONNX export (made once, cached under SAGE_HOME, never half-written),
the PyTorch fallback where ONNX Runtime is absent, and indexes that refuse to mix them.

Retrieval quality on both backends is checked in test_rag_index.py (its `built` fixture builds one of each).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sage_magic import rag
from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError

pytestmark = pytest.mark.rag

DOCS = Path(__file__).parent / "fixtures" / "rag" / "docs"
REPO = Path(__file__).resolve().parent.parent
GPU_QUESTION = "How do I pick which graphics card the server runs on?"
#: Runs a Python snippet as a process in which `import onnxruntime` fails, as where it is not installed.
WITHOUT_ONNX_RUNTIME = "import sys; sys.modules['onnxruntime'] = None\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SAGE home for the tests below: its ONNX export is made once and shared, as for a user."""
    return tmp_path_factory.mktemp("home")


def exports(home: Path) -> list[Path]:
    return [p for p in (home / "cache" / "embedders").iterdir() if not p.name.startswith(".")]


def run_cli(home: Path, *args: str, without_onnx_runtime: bool = False) -> subprocess.CompletedProcess[str]:
    prelude = WITHOUT_ONNX_RUNTIME if without_onnx_runtime else ""
    script = prelude + "from sage_magic.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "SAGE_HOME": str(home)}
    env.pop("SAGE_EMBED_BACKEND", None)
    return subprocess.run([sys.executable, "-c", "import sys\n" + script, *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_new_index_is_embedded_with_onnx_and_the_export_is_made_once(home: Path) -> None:
    settings = Settings.from_env(environ={}, home=home)
    assert rag.add(settings, "docs", [str(DOCS)]).notes == ()
    assert rag.describe(settings, "docs").backend == "onnx"
    [export] = exports(home)
    assert sorted(p.name for p in export.iterdir()) == ["export.json", "model.onnx", "tokenizer.json"]
    made = (export / "model.onnx").stat().st_mtime_ns
    rag.add(settings, "again", [str(DOCS)])
    assert exports(home) == [export] and (export / "model.onnx").stat().st_mtime_ns == made  # reused, not redone
    assert rag.search(settings, "docs", GPU_QUESTION, top_k=1)[0].source == "gpu.md"


def test_mixing_backends_is_refused_and_a_rebuild_switches(home: Path) -> None:
    on_torch = Settings.from_env(environ={"SAGE_EMBED_BACKEND": "torch"}, home=home)
    on_onnx = Settings.from_env(environ={"SAGE_EMBED_BACKEND": "onnx"}, home=home)
    rag.add(on_torch, "old", [str(DOCS)])
    assert rag.describe(on_torch, "old").backend == "torch"
    for attempt in (lambda: rag.search(on_onnx, "old", "gpu"), lambda: rag.update(on_onnx, "old"),
                    lambda: rag.add(on_onnx, "old", [str(DOCS)])):
        with pytest.raises(SageError, match=r"embedded with the torch backend, not onnx.*--rebuild"):
            attempt()
    automatic = Settings.from_env(environ={}, home=home)  # unset: an index keeps its own backend
    assert rag.search(automatic, "old", GPU_QUESTION, top_k=1)[0].source == "gpu.md"
    assert rag.update(automatic, "old").chunks_embedded == 0
    rag.add(on_onnx, "old", [str(DOCS)], rebuild=True)
    assert rag.describe(automatic, "old").backend == "onnx"
    assert rag.search(on_onnx, "old", GPU_QUESTION, top_k=1)[0].source == "gpu.md"


def test_an_index_keeps_the_export_format_that_embedded_it(home: Path) -> None:
    """An index from an older export recipe queries with that export while the cache has it (another recipe's
    vectors would rank its chunks slightly differently); once it is gone the index asks to be rebuilt, and the
    rebuild uses the current recipe."""
    import json
    from dataclasses import replace

    from sage_magic.rag import store
    from sage_magic.rag.model_ref import EXPORT_FORMAT, resolve_embedder
    from sage_magic.rag.onnx_export import folder_name

    settings = Settings.from_env(environ={}, home=home)
    rag.add(settings, "older", [str(DOCS)])
    manifest = store.index_dir(settings, "older") / "manifest.json"
    assert json.loads(manifest.read_text())["export_format"] == EXPORT_FORMAT
    current = resolve_embedder(None, "onnx", settings.embedder_cache)
    stand_in = settings.embedder_cache / folder_name(replace(current, export_format=EXPORT_FORMAT - 1))
    shutil.copytree(settings.embedder_cache / folder_name(current), stand_in)  # as a user's cache holds it
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "export_format": EXPORT_FORMAT - 1}))
    try:
        assert rag.search(settings, "older", GPU_QUESTION, top_k=1)[0].source == "gpu.md"
        shutil.rmtree(stand_in)
        refused = run_cli(home, "index", "query", "older", "gpu")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"earlier ONNX export of all-MiniLM-L6-v2 (format {EXPORT_FORMAT - 1})" in refused.stderr
        assert "sage index add NAME PATH... --rebuild" in refused.stderr
        assert not stand_in.exists()  # nothing re-made under the old recipe's name
        rag.add(settings, "older", [str(DOCS)], rebuild=True)
        assert json.loads(manifest.read_text())["export_format"] == EXPORT_FORMAT
        assert rag.search(settings, "older", GPU_QUESTION, top_k=1)[0].source == "gpu.md"
    finally:
        shutil.rmtree(stand_in, ignore_errors=True)


def test_an_unknown_backend_name_is_refused_with_the_choices() -> None:
    with pytest.raises(SageError, match=r"SAGE_EMBED_BACKEND='gpu'.*onnx.*torch.*auto"):
        Settings.from_env(environ={"SAGE_EMBED_BACKEND": "gpu"})
    assert Settings.from_env(environ={"SAGE_EMBED_BACKEND": "Auto"}).embed_backend is None


def test_without_onnx_runtime_indexes_build_with_torch_and_say_so_once(home: Path, tmp_path: Path) -> None:
    out = run_cli(tmp_path / "plain", "index", "add", "docs", str(DOCS), without_onnx_runtime=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Note: ONNX Runtime is not installed.") == 1 and "pip install onnxruntime" in out.stdout
    assert "Traceback" not in out.stderr
    shown = run_cli(tmp_path / "plain", "index", "show", "docs", without_onnx_runtime=True)
    assert "torch backend" in shown.stdout
    query = run_cli(tmp_path / "plain", "index", "query", "docs", GPU_QUESTION, "--top-k", "1",
                    without_onnx_runtime=True)
    assert query.returncode == 0 and query.stdout.startswith("[1] gpu.md")

    rag.add(Settings.from_env(environ={}, home=home), "fast", [str(DOCS)])  # an ONNX index, then ORT goes away
    refused = run_cli(home, "index", "query", "fast", "gpu", without_onnx_runtime=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "embedded with ONNX Runtime, which is not installed here" in refused.stderr
    assert "SAGE_EMBED_BACKEND=torch sage index add fast PATH... --rebuild" in refused.stderr


def test_an_export_killed_midway_leaves_no_half_model(tmp_path: Path) -> None:
    """Killed while the ONNX file is being written: no export counts as made, and the next build makes one."""
    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        from sage_magic import rag
        from sage_magic.core.config import Settings
        rag.add(Settings.from_env(environ={{}}, home={str(home)!r}), "docs", [{str(DOCS)!r}])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    cache = home / "cache" / "embedders"
    deadline = time.monotonic() + 300
    while not list(cache.glob(".*.tmp/fp32.onnx")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert exports(home) == [] and list(cache.glob(".*.tmp"))  # a hidden leftover, no export

    settings = Settings.from_env(environ={}, home=home)
    rag.add(settings, "docs", [str(DOCS)])
    assert rag.describe(settings, "docs").backend == "onnx" and len(exports(home)) == 1
    assert not list(cache.glob(".*.tmp"))  # the next exporter cleaned up
    assert rag.search(settings, "docs", GPU_QUESTION, top_k=1)[0].source == "gpu.md"
