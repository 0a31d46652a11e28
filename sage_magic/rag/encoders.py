"""The two ways an embedder turns texts into vectors: sentence-transformers on PyTorch, or ONNX Runtime.

Both produce the same unit vectors up to int8 rounding (cosine >= 0.98 to PyTorch's, checked when the ONNX
model is exported). The ONNX path needs neither torch nor transformers once its export exists: the model runs
in ONNX Runtime and the text is cut into tokens by the model's own fast tokenizer (the ``tokenizers``
package), set up exactly as sentence-transformers sets it (verified on sample texts at export time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..core.errors import SageError
from .threads import one_thread

if TYPE_CHECKING:
    import numpy as np

#: Texts per forward pass: sentence-transformers' default, what the floor of rag_bench uses too. Sorting a
#: build's texts by length first keeps padding (wasted work) small.
BATCH = 32


class Encoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class TorchEncoder:
    """sentence-transformers on PyTorch: the reference, and the fallback where ONNX Runtime is absent."""

    def __init__(self, path: Path, attention: str | None = None) -> None:
        """``attention`` picks transformers' attention implementation (the ONNX export traces "eager")."""
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
            self.model = SentenceTransformer(str(path), local_files_only=True, device="cpu",
                                             model_kwargs={"attn_implementation": attention} if attention else None)
        except (OSError, ValueError) as error:
            raise SageError(
                f"Could not load the embedding model at {path} ({error}). Check that the folder holds a complete "
                "sentence-transformers model, or leave --embedder out to use the bundled all-MiniLM-L6-v2."
            ) from None
        self.dim = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        # A query is one short text: splitting it over torch's threads costs more than it saves (threads.py).
        if len(texts) == 1:
            with one_thread(torch.get_num_threads, torch.set_num_threads):
                return self._encode(texts)
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )


class OnnxEncoder:
    """An exported, int8-quantized model (see onnx_export) run by ONNX Runtime, with no torch in the process.

    Two sessions share the model file: one on every core for batches, one on one thread for single queries
    (a short text split over threads waits for them more than it computes, as with torch and FAISS)."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        spec = json.loads((folder / "export.json").read_text())
        self.dim = int(spec["dim"])
        self._lowercase = bool(spec["lowercase"])
        self._inputs = [(name, _ENCODING_FIELD[name]) for name in spec["inputs"]]
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(int(spec["max_seq_length"]))
        self._tokenizer.enable_padding(pad_id=int(spec["pad_id"]), pad_token=spec["pad_token"])

        def session(threads: int) -> ort.InferenceSession:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # ONNX Runtime's own warnings are not the user's business
            # idle pool threads sleep instead of spinning: on a busy 2-core machine a spinning thread takes the
            # core its partner (or anything else) needs (1.11-1.19x the chunks/s at load 4-5, the same quiet)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

        self._batches = session(os.cpu_count() or 1)
        self._single = session(1)

    def token_ids(self, text: str) -> list[int]:
        """The tokens one text becomes (what onnx_export compares with sentence-transformers')."""
        return list(self._tokenizer.encode(text.lower() if self._lowercase else text).ids)

    def encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        if self._lowercase:
            texts = [text.lower() for text in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        session = self._single if len(texts) == 1 else self._batches
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # alike lengths pad alike
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            encodings = self._tokenizer.encode_batch([texts[i] for i in rows])
            feeds = {name: np.array([getattr(e, field) for e in encodings], dtype=np.int64)
                     for name, field in self._inputs}
            out[rows] = session.run(None, feeds)[0]
        return out


#: Which attribute of a ``tokenizers.Encoding`` feeds each model input.
_ENCODING_FIELD = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
