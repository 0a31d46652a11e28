"""Errors the manager gives before it starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_magic.errors import SageError
from tests.conftest import make_settings


def test_no_vllm_in_the_serving_interpreter_says_how_to_install(demo_home: Path, tmp_path: Path, monkeypatch) -> None:
    from sage_magic import vllm_env
    from sage_magic.manager import Manager

    monkeypatch.setattr(vllm_env, "installed_vllm", lambda: None)
    manager = Manager(make_settings(demo_home, tmp_path / "run"))
    with pytest.raises(SageError) as error:
        manager.serve_finetune("demo_expert")
    assert "install-cpu.sh" in str(error.value) and "--backend openai" in str(error.value)
    assert manager.registry.all() == []
