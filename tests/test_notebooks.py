"""The example notebooks run top to bottom in a real kernel, with their own assert cells, against the
session's demo home and shared vLLM server; after EVERY cell the kernel must still hold no heavy module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import env_for

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
HEAVY = ("torch", "transformers", "peft", "vllm", "sentence_transformers", "faiss")
PROBE = f"import sys as _s; print('heavy modules:', [m for m in {HEAVY!r} if m in _s.modules])"

pytestmark = [pytest.mark.vllm, pytest.mark.kernel, pytest.mark.rag]


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, settings, expert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    for key, value in env_for(settings).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(path, as_version=4)
    cells = []
    for cell in notebook.cells:
        cells.append(cell)
        if cell.cell_type == "code":
            cells.append(nbformat.v4.new_code_cell(PROBE, metadata={"probe_after": cell.source.splitlines()[0]}))
    notebook.cells = cells
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    probes = [(c.metadata["probe_after"], "".join(o.get("text", "") for o in c.outputs))
              for c in notebook.cells if "probe_after" in c.metadata]
    assert probes
    assert [(cell, out) for cell, out in probes if out.strip() != "heavy modules: []"] == []
