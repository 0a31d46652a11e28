"""The catalog of fine-tunes laid out the SAGE way, and the checks that make serving them safe.

Layout (kept compatible with SAGE's ``sage finetune``)::

    $SAGE_HOME/finetune_output/NAME/
        finetune_meta.json        {"model": BASE, ...}   BASE: a local path or a name mapped to one
        checkpoints/checkpoint-N/ intermediate adapters (newest = largest N, compared as numbers)
        lora_weights/             the final adapter
        merged_model/             present once merged (see merge.py)

A base named in ``model`` is resolved, in order: as a path (absolute, ``~``, or relative to the fine-tune
folder), through ``$SAGE_HOME/models.json`` (``{"org/name": "/local/path"}``), then as
``$SAGE_HOME/models/<name>``. Everything here reads JSON and safetensors headers only: no torch.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core.config import Settings
from ..core.errors import IncompatibleAdapter, NotFound, SageError, fold
from ..core.files import subfolders
from ..core.fingerprint import stat_key

META_FILE = "finetune_meta.json"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged_model"
MERGED_MARKER = ".sage_merged.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class FineTune:
    """One fine-tune as found on disk; ``adapter_dir`` is what gets served or merged."""

    name: str
    root: Path
    base_ref: str
    base_path: Path
    adapter_dir: Path
    checkpoints: tuple[tuple[int, Path], ...]
    rank: int
    adapter_base_ref: str | None

    @property
    def merged_dir(self) -> Path:
        return self.root / MERGED_DIR

    @property
    def is_merged(self) -> bool:
        """True only for a complete merge (the marker is written last)."""
        return (self.merged_dir / MERGED_MARKER).is_file()

    @property
    def newest_checkpoint(self) -> int | None:
        return self.checkpoints[-1][0] if self.checkpoints else None


@dataclass(frozen=True)
class CatalogEntry:
    """A row of `sage finetune list`: a usable fine-tune, or the reason it is not usable."""

    name: str
    finetune: FineTune | None
    problem: str | None
    #: The base the metadata names, even when it cannot be found here: that is what a user needs to see
    #: to fix a "base not found" problem.
    base: str | None = None

    def as_dict(self) -> dict[str, object]:
        ft = self.finetune
        return {
            "name": self.name,
            "base": self.base,
            "base_path": str(ft.base_path) if ft else None,
            "adapter": str(ft.adapter_dir) if ft else None,
            "newest_checkpoint": ft.newest_checkpoint if ft else None,
            "rank": ft.rank if ft else None,
            "merged": ft.is_merged if ft else False,
            "problem": self.problem,
        }


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object, turning every way it can be unreadable into one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"{what} is missing: {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SageError(f"{what} at {path} cannot be read ({error}). Fix or restore the file.") from None
    if not isinstance(data, dict):
        raise SageError(f"{what} at {path} is not a JSON object. Fix or restore the file.")
    return data


def known_names(settings: Settings) -> list[str]:
    """Names of the folders under the fine-tune root, usable or not (`list_finetunes` says which)."""
    return subfolders(settings.finetune_root)


def resolve_base(settings: Settings, ref: str, relative_to: Path | None = None) -> Path:
    """Turn a base-model reference (path or name) into a local model folder, or say how to map it."""
    candidates: list[Path] = []
    as_path = Path(ref).expanduser()
    if as_path.is_absolute():
        candidates.append(as_path)
    elif relative_to is not None:
        candidates.append(relative_to / as_path)
    mapping_file = settings.home / "models.json"
    if mapping_file.is_file():
        mapped = read_json(mapping_file, "The model name map").get(ref)
        if isinstance(mapped, str):
            candidates.append(Path(mapped).expanduser())
    candidates.append(settings.models_root / ref)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise NotFound(
        f"The base model {ref!r} was not found on this machine (looked at: "
        f"{', '.join(str(c) for c in candidates)}). Nothing is downloaded: put the model there, or map the "
        f"name to a local folder in {mapping_file} as {{\"{ref}\": \"/path/to/model\"}}."
    )


def _base_ref(meta: dict, path: Path) -> str:
    """The meta file's "model" field, or an error that says what is wrong with it (missing, empty, not text)."""
    example = 'e.g. {"model": "/path/to/base"} or a name mapped in models.json'
    if "model" not in meta:
        raise SageError(f'{path} has no "model" field naming the base model. Add one, {example}.')
    ref = meta["model"]
    if not isinstance(ref, str):
        kind = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
            type(ref), "null" if ref is None else type(ref).__name__)
        raise SageError(
            f'{path} has "model": {json.dumps(ref)}, which is {kind}; it must be a string naming the base model '
            f"(a local path or a name). Fix it, {example}."
        )
    if not ref.strip():
        raise SageError(f'{path} has an empty "model" field; it must name the base model. Fill it in, {example}.')
    return ref


def checkpoints_of(root: Path) -> tuple[tuple[int, Path], ...]:
    """(N, folder) of every checkpoints/checkpoint-N, oldest first: numbers compared as numbers."""
    folder = root / "checkpoints"
    if not folder.is_dir():
        return ()
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return tuple(sorted(found))


def get_finetune(settings: Settings, name: str) -> FineTune:
    """Find fine-tune NAME, or raise an error that lists the known ones."""
    root = settings.finetune_root / name
    if not name or "/" in name or not (root / META_FILE).is_file():
        known = known_names(settings)
        import difflib  # only for a name not found

        close = difflib.get_close_matches(name, known, n=3)
        listing = (f"{len(known)}: {fold(close + [k for k in known if k not in close])}" if known
                   else "none yet (try `sage finetune demo`)")
        raise NotFound(
            f"No fine-tune named {name!r} under {settings.finetune_root}. Known fine-tunes, closest first: {listing}. "
            "`sage finetune list` shows them with their base models."
        )
    meta = read_json(root / META_FILE, f"The metadata of fine-tune {name!r}")
    base_ref = _base_ref(meta, root / META_FILE)
    checkpoints = checkpoints_of(root)
    final = root / "lora_weights"
    if (final / ADAPTER_CONFIG).is_file():
        adapter_dir = final
    elif checkpoints and (checkpoints[-1][1] / ADAPTER_CONFIG).is_file():
        adapter_dir = checkpoints[-1][1]
    else:
        raise NotFound(
            f"Fine-tune {name!r} has no LoRA adapter: neither {final} nor a checkpoints/checkpoint-N folder "
            f"holds {ADAPTER_CONFIG}. Finish or re-run the training."
        )
    adapter_cfg = read_json(adapter_dir / ADAPTER_CONFIG, f"The adapter config of {name!r}")
    rank = adapter_cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise SageError(f"{adapter_dir / ADAPTER_CONFIG} has no valid rank \"r\". Re-save the adapter with peft.")
    return FineTune(
        name=name,
        root=root,
        base_ref=base_ref,
        base_path=resolve_base(settings, base_ref, relative_to=root),
        adapter_dir=adapter_dir,
        checkpoints=checkpoints,
        rank=rank,
        adapter_base_ref=adapter_cfg.get("base_model_name_or_path"),
    )


def list_finetunes(settings: Settings) -> list[CatalogEntry]:
    """Every folder under the fine-tune root, usable or not (a broken one shows its problem)."""
    entries = []
    for name in known_names(settings):
        try:
            ft = get_finetune(settings, name)
            check_adapter(settings, ft)
            entries.append(CatalogEntry(name, ft, None, ft.base_ref))
        except SageError as error:
            partial = None
            try:
                partial = get_finetune(settings, name)
            except SageError:
                pass
            entries.append(CatalogEntry(name, partial, str(error), _declared_base(settings.finetune_root / name)))
    return entries


def _declared_base(root: Path) -> str | None:
    """The "model" a fine-tune's metadata names, or None when the file or the field is unusable."""
    try:
        ref = json.loads((root / META_FILE).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return ref if isinstance(ref, str) and ref else None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length + JSON), without loading any weights."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise SageError(f"{path} is not a readable safetensors file ({error}). Re-save the adapter.") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_adapter(settings: Settings, ft: FineTune, max_rank: int | None = None) -> None:
    """Refuse adapters vLLM would reject or silently mis-serve, with what to do instead.

    Checks: the adapter names the same base (when its reference resolves here), its rank fits the server's
    ``--max-lora-rank``, and the LoRA matrices of every layer the base's config sizes have that layer's
    dimensions. Only what certainly cannot load is refused; what the config does not determine is vLLM's call.
    """
    limit = settings.max_lora_rank if max_rank is None else max_rank
    if ft.adapter_base_ref and ft.adapter_base_ref != ft.base_ref:
        try:
            adapter_base = resolve_base(settings, ft.adapter_base_ref, relative_to=ft.root)
        except NotFound:
            adapter_base = None  # trained elsewhere under a name unknown here: the shape check decides
        if adapter_base is not None and adapter_base != ft.base_path:
            raise IncompatibleAdapter(
                f"Fine-tune {ft.name!r} was trained on {ft.adapter_base_ref!r} ({adapter_base}) but its "
                f"finetune_meta.json names {ft.base_ref!r} ({ft.base_path}). Point \"model\" at the base the "
                "adapter was trained on."
            )
    if ft.rank > limit:
        raise IncompatibleAdapter(
            f"Fine-tune {ft.name!r} has LoRA rank {ft.rank}, above the server's limit of {limit}. Raise it "
            f"(SAGE_MAX_LORA_RANK={ft.rank} or --max-lora-rank {ft.rank}) or serve it merged (--merge)."
        )
    base_config = ft.base_path / "config.json"
    read_json(base_config, f"The config of base model {ft.base_ref!r}")  # unreadable: say so, as always
    weights = ft.adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise NotFound(f"{weights} is missing: the adapter of {ft.name!r} has no weights. Re-save it with peft.")
    misfit = _misfit(stat_key(weights), stat_key(base_config))
    if misfit:
        key, shape, problem = misfit
        raise IncompatibleAdapter(
            f"The adapter of {ft.name!r} does not fit base model {ft.base_ref!r}: tensor {key} has shape "
            f"{shape}, {problem}. It was trained on another architecture; point finetune_meta.json's "
            "\"model\" at the base it was trained on."
        )


@functools.lru_cache(maxsize=256)
def _misfit(weights: tuple[str, int, int], base_config: tuple[str, int, int]) -> tuple[str, list[int], str] | None:
    """The first LoRA tensor that cannot load into the base, as (key, shape, why), or None. Cached by both
    files' (path, size, mtime): every warm reuse of a fine-tune checks it again, and the shapes of a file
    that did not change did not change either."""
    base_cfg = read_json(Path(base_config[0]), "The base model's config")
    for key, shape in safetensors_shapes(Path(weights[0])).items():
        problem = _shape_problem(key, shape, base_cfg)
        if problem:
            return key, shape, problem
    return None


#: LoRA tensor kinds, and which of their dimensions must equal a size of the base layer they adapt:
#: lora_A is (rank, in features), lora_B (out features, rank); on embeddings peft stores lora_embedding_A as
#: (rank, vocabulary) and lora_embedding_B as (hidden, rank).
_LORA_TENSOR = re.compile(r"(?:^|\.)(?P<module>[^.]+)\.(?P<kind>lora_(?:embedding_)?[AB])(?:\.|$)")
_SIDE = {"lora_A": ("input", -1), "lora_B": ("output", 0), "lora_embedding_A": ("input", -1),
         "lora_embedding_B": ("output", 0)}


def _shape_problem(key: str, shape: list[int], base_cfg: dict) -> str | None:
    """Why tensor ``key`` certainly cannot load into the base, or None when it may.

    Only module names whose sizes follow from the config are judged (unfused and fused attention and MLP
    projections, lm_head, embed_tokens); anything else (modules_to_save weights, unknown layer names) is
    left to vLLM. Every sub-config with a hidden size (``text_config``, ``vision_config``...) is a
    candidate, and a size matching any of them passes.
    """
    match = _LORA_TENSOR.search(key)
    if match is None or not shape:
        return None
    side, axis = _SIDE[match["kind"]]
    expected: set[int] = set()
    for cfg in _sub_configs(base_cfg):
        sizes = layer_sizes(cfg).get(match["module"])
        if sizes is None:
            continue
        allowed = sizes[0 if side == "input" else 1]
        if allowed is None:
            return None  # this side depends on something the config cannot pin down (a resized vocabulary)
        expected |= allowed
    if not expected or shape[axis] in expected:
        return None
    return f"but the {side} size of {match['module']} in the base is {' or '.join(map(str, sorted(expected)))}"


def _sub_configs(cfg: dict) -> list[dict]:
    """The config and its nested model configs (multimodal models keep the language model in text_config)."""
    found = [cfg]
    for value in cfg.values():
        if isinstance(value, dict) and any(k in value for k in ("hidden_size", "n_embd", "d_model")):
            found += _sub_configs(value)
    return found


def layer_sizes(cfg: dict) -> dict[str, tuple[set[int] | None, set[int] | None]]:
    """(input sizes, output sizes) of the layers a config determines, by module name; None: not determined."""
    def whole(*keys: str) -> int | None:
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    hidden = whole("hidden_size", "n_embd", "d_model")
    if hidden is None:
        return {}
    model = {hidden}
    sizes: dict[str, tuple[set[int] | None, set[int] | None]] = {
        "lm_head": (model, None),  # the vocabulary side may be resized or padded: not certain
        "embed_tokens": (None, model),
    }
    heads = whole("num_attention_heads", "n_head")
    if heads:
        head_dim = whole("head_dim") or hidden // heads
        kv_heads = whole("num_key_value_heads") or heads
        q, kv = heads * head_dim, kv_heads * head_dim
        sizes.update({"q_proj": (model, {q}), "k_proj": (model, {kv}), "v_proj": (model, {kv}),
                      "o_proj": ({q}, model), "qkv_proj": (model, {q + 2 * kv})})
    # Dense and mixture-of-experts MLPs: intermediate_size, moe_intermediate_size, per-layer lists...
    inner: set[int] = set()
    for key, value in cfg.items():
        if "intermediate_size" in key or key in ("ffn_dim", "n_inner"):
            values = value if isinstance(value, list) else [value]
            inner |= {v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0}
    if inner:
        sizes.update({"gate_proj": (model, inner), "up_proj": (model, inner), "down_proj": (inner, model),
                      "gate_up_proj": (model, {2 * i for i in inner})})
    return sizes
