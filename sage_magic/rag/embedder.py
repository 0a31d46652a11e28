"""Loading a local sentence-embedding model once per process, only when an index is built or queried.

Loading costs seconds and pulls torch or ONNX Runtime (encoders.py), so it happens in the helper process
that embeds, never in the kernel; which model and backend to load is model_ref.py's business.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .encoders import Encoder, OnnxEncoder, TorchEncoder
from .model_ref import ONNX, TORCH, BackendUnavailable, EmbedderRef, onnx_missing

if TYPE_CHECKING:
    import numpy as np


class Embedder:
    """A loaded model producing L2-normalized float32 vectors (cosine = dot product), whatever its backend."""

    def __init__(self, ref: EmbedderRef) -> None:
        self.ref = ref
        self._encoder: Encoder = open_encoder(ref)
        self.dim = self._encoder.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of texts as an (n, dim) float32 array of unit vectors."""
        import numpy as np

        vectors = self._encoder.encode(list(texts))
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


_LOADING = threading.Lock()


def load_embedder(ref: EmbedderRef) -> Embedder:
    """The process-wide instance of a model: loaded on first use, then shared by every index and query.

    Two threads asking at once wait for one load instead of loading the model twice."""
    with _LOADING:
        return _load(ref)


def load_for_build(ref: EmbedderRef, fall_back: bool) -> tuple[Embedder, str]:
    """The model that embeds a build, and a note for its report when ONNX had to give way to PyTorch.

    ``fall_back`` is true when nobody asked for ONNX by name (a new index on "auto"): then an environment
    without ONNX Runtime, or a model that does not export, builds with PyTorch and says so once, instead of
    failing. An index that already holds ONNX vectors never falls back (its vectors would not match)."""
    try:
        return load_embedder(ref), ""
    except BackendUnavailable as why:
        if not fall_back or ref.backend != ONNX:
            raise
        advice = ("For the fast backend: `pip install onnxruntime onnx` (both are in the rag extra), then rebuild "
                  "with `sage index add NAME PATH... --rebuild`." if why.install else "The index works as it is.")
        note = (f"{why} This index was embedded with PyTorch instead (about 2x slower to build, 5x slower to "
                f"embed a query). {advice}")
        return load_embedder(replace(ref, backend=TORCH, cache=None)), note


@functools.lru_cache(maxsize=4)
def _load(ref: EmbedderRef) -> Embedder:
    return Embedder(ref)


def open_encoder(ref: EmbedderRef) -> Encoder:
    """The encoder for ``ref``'s backend; the ONNX one exports the model first if its cache has no export."""
    if ref.backend != ONNX:
        return TorchEncoder(ref.path)
    missing = onnx_missing()
    if missing:
        raise BackendUnavailable(f"{missing}.", install=True)
    from .onnx_export import exported  # torch and onnx, only when there is no export yet

    return OnnxEncoder(exported(ref))
