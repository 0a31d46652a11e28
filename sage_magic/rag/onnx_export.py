"""Exporting an embedding model to int8 ONNX, once per model, into SAGE_HOME's cache, never half-written.

Layout: ``$SAGE_HOME/cache/embedders/NAME-onnx-int8-KEY/`` holds ``model.onnx`` (int8 weights),
``tokenizer.json`` and ``export.json`` (what the runtime needs to feed it). KEY hashes the model folder's
file names, sizes and modification times and EXPORT_FORMAT, so a changed or reinstalled model gets a new
export. The export is written into a hidden folder beside, then renamed into place: a folder with the final
name is always complete, and a crash (or kill) mid-export leaves only a hidden leftover, removed by the next
export. Exporters hold a lock per model, so a second process waits for the first one's export instead of
repeating it.

The steps (format 2, model_ref.EXPORT_FORMAT), all offline, on the packaged model files: sentence-transformers
loads the model on PyTorch with its plain ("eager") attention; its whole pipeline (transformer, pooling,
normalization) is traced to ONNX by torch's TorchScript exporter, with batch size and length left free; ONNX
Runtime's transformer optimizer fuses each layer's attention, layer norms and GELU into single operators
(the eager graph is the pattern it knows: PyTorch's fused attention kernel traces into one it does not);
then dynamic quantization stores the weights of every matrix product with a constant side, and of the fused
attention's input projections, as int8, one scale per output channel (activations are quantized on the fly,
so no calibration data is needed). On MiniLM that runs ~1.4x faster than format 1 (the same without the
fusion, attention in float) at cosine >= 0.99 from PyTorch. Per-tensor scales, or quantizing the
activation-by-activation products of attention, put MiniLM's vectors at cosine 0.89 from PyTorch's. Finally
the result is compared with PyTorch on sample texts: the same tokens, and every vector within MIN_COSINE. An
export that fails that check is refused (BackendUnavailable; a new index falls back to PyTorch), never used.

An index keeps the format that embedded it (its manifest says which): its export stays in the cache and
keeps serving it, since another recipe's vectors would rank its chunks slightly differently. Only the
current format is made; an index whose older export is gone from the cache is asked to be rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.files import exclusive
from .model_ref import EXPORT_FORMAT, BackendUnavailable, EmbedderRef

if TYPE_CHECKING:
    from .encoders import OnnxEncoder, TorchEncoder

#: The least cosine similarity between an int8 vector and PyTorch's for the same text, checked on PROBES.
MIN_COSINE = 0.98
#: Texts the export is checked on: short and long (past the model's length limit), cased, accented, code.
PROBES = (
    "How do I pick which graphics card the server runs on?",
    "GPU",
    "Résumé of the naïve café's Übersicht, with CUDA_VISIBLE_DEVICES=1 and `pip install -e '.[rag]'`.",
    "def search(index, query, k):\n    return index.search(query.reshape(1, -1), k)",
    " ".join(["The keep-alive keeps a server running after its last user leaves, for five minutes."] * 40),
)


def exported(ref: EmbedderRef) -> Path:
    """The folder of ``ref``'s int8 ONNX export, made now if the cache has none (seconds, once per model)."""
    if ref.cache is None:
        raise ValueError("an ONNX embedder needs a cache folder (Settings.embedder_cache)")
    final = ref.cache / folder_name(ref)
    if (final / "export.json").is_file():
        return final
    if ref.export_format != EXPORT_FORMAT:
        raise BackendUnavailable(
            f"This index was embedded by an earlier ONNX export of {ref.id} (format {ref.export_format}), which is no "
            f"longer in {ref.cache}; sage_magic now makes format {EXPORT_FORMAT} only, whose vectors differ slightly. "
            "Re-embed the index with it: `sage index add NAME PATH... --rebuild` (`sage index show NAME` lists its "
            "paths)."
        )
    ref.cache.mkdir(parents=True, exist_ok=True)
    with exclusive(ref.cache / f".{final.name}.lock"):
        if (final / "export.json").is_file():  # another process exported it while we waited
            return final
        for leftover in ref.cache.glob(f".{final.name}.*.tmp"):  # killed exporters' (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a final folder without export.json was not made by us
        temporary = ref.cache / f".{final.name}.{os.getpid()}.tmp"
        temporary.mkdir()
        try:
            _export(ref.path, temporary)
            _sync(temporary)
            os.replace(temporary, final)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return final


def folder_name(ref: EmbedderRef) -> str:
    """``NAME-onnx-int8-KEY``: readable, and new whenever the model's files change."""
    digest = hashlib.sha256(f"format {ref.export_format}\n".encode())
    for path in sorted(p for p in ref.path.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(ref.path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(ref.id).name).strip("-.") or "model"
    return f"{name}-onnx-int8-{digest.hexdigest()[:12]}"


def _export(model_path: Path, out: Path) -> None:
    """Write model.onnx, tokenizer.json and export.json into ``out``, checked against PyTorch."""
    try:
        with _root_logger_kept():
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise BackendUnavailable(
            "The onnx package is missing, and ONNX Runtime needs it to quantize the model once.", install=True
        ) from None
    import torch

    from .encoders import OnnxEncoder, TorchEncoder

    reference = TorchEncoder(model_path, attention="eager")
    model = reference.model
    tokenizer = model.tokenizer
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    if not getattr(tokenizer, "is_fast", False) or names[:2] != ["input_ids", "attention_mask"]:
        raise BackendUnavailable(f"The embedding model at {model_path} has no fast tokenizer with the usual inputs, "
                                 "so it cannot run without PyTorch.")

    class Pipeline(torch.nn.Module):
        """The sentence-transformers model as one function of tensors, which is what ONNX can hold."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(dict(zip(names, tensors)))["sentence_embedding"]

    sample = model.preprocess(list(PROBES[:2]))
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's
            torch.onnx.export(Pipeline().eval(), tuple(sample[n] for n in names), str(out / "fp32.onnx"),
                              input_names=names, output_names=["sentence_embedding"],
                              dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                              opset_version=17, dynamo=False)
        with _root_logger_kept():
            _fuse(out / "fp32.onnx", out / "fused.onnx", model[0].auto_model.config)
            quantize_dynamic(out / "fused.onnx", out / "model.onnx", weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Attention"],
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as error:  # noqa: BLE001 - any exporter failure means "this model stays on PyTorch"
        raise BackendUnavailable(
            f"The embedding model at {model_path} could not be exported to ONNX ({type(error).__name__}: {error})."
        ) from None
    (out / "fp32.onnx").unlink()
    (out / "fused.onnx").unlink()
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out / "tokenizer.json"))
    spec = {
        "format": EXPORT_FORMAT,
        "dim": reference.dim,
        "max_seq_length": int(model.max_seq_length),
        "lowercase": bool(getattr(model[0], "do_lower_case", False)),
        "inputs": names,
        "pad_id": int(tokenizer.pad_token_id or 0),
        "pad_token": str(tokenizer.pad_token),
        "source": str(model_path),
    }
    (out / "export.json").write_text(json.dumps(spec, indent=1))
    _check(OnnxEncoder(out), reference, model_path)


def _fuse(source: Path, target: Path, config: object) -> None:
    """ONNX Runtime's BERT fusions (attention, embedding and skip layer norms, GELU) where the graph has their
    patterns; a model of another family keeps the operators it has (the check after the export decides)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    # opt_level 0: only these fusions; ONNX Runtime's own graph optimizations run when a session loads the model
    optimize_model(str(source), model_type="bert", num_heads=int(heads or 0), hidden_size=int(hidden or 0),
                   opt_level=0).save_model_to_file(str(target))


def _check(ours: OnnxEncoder, reference: TorchEncoder, model_path: Path) -> None:
    """Refuse an export that does not embed like PyTorch: other tokens, or a vector off by more than int8 noise."""
    import numpy as np

    texts = list(PROBES)
    expected_ids = [reference.model.preprocess([t])["input_ids"][0].tolist() for t in texts]
    if [ours.token_ids(t) for t in texts] != expected_ids:
        raise BackendUnavailable(f"The embedding model at {model_path} cuts text into other tokens outside "
                                 "PyTorch, so its ONNX export cannot be trusted.")
    expected = reference.encode(texts)
    worst = min(float(np.min(np.sum(ours.encode(texts) * expected, axis=1))),  # a padded batch...
                min(float(ours.encode([t])[0] @ expected[i]) for i, t in enumerate(texts)))  # ...and alone
    if worst < MIN_COSINE:
        raise BackendUnavailable(f"The int8 ONNX export of the embedding model at {model_path} strays too far "
                                 f"from PyTorch (cosine {worst:.3f} < {MIN_COSINE}).")


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """ONNX Runtime's quantizer configures the root logger as it loads (every library's INFO lines to stderr)
    and gives advice through it: keep both from the user's terminal and restore the logger as it was."""
    root = logging.getLogger()
    handlers, level, disabled = root.handlers[:], root.level, root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.disable(disabled)


def _sync(folder: Path) -> None:
    """Flush the export's files to disk before the rename publishes them (a power cut must not half-publish)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
