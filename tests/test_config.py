"""Settings read every env var in one place; keep-alive durations parse like Ollama's."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_magic.core.config import Settings, parse_duration
from sage_magic.core.errors import SageError


@pytest.mark.parametrize("text,seconds", [("0", 0.0), ("-1", -1.0), ("45", 45.0), ("30s", 30.0), ("5m", 300.0),
                                          ("1h", 3600.0), ("1.5m", 90.0), ("-5m", -1.0)])
def test_keep_alive_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_keep_alive_says_what_is_accepted() -> None:
    with pytest.raises(SageError, match="30s, 5m, 1h"):
        parse_duration("soon")


def test_env_vars_set_defaults_and_options_win(tmp_path: Path) -> None:
    env = {"SAGE_HOME": str(tmp_path / "h"), "SAGE_RUNTIME_DIR": str(tmp_path / "r"), "SAGE_KEEP_ALIVE": "5m",
           "SAGE_VLLM_ARGS": "--enforce-eager --max-model-len 1024", "SAGE_FINETUNE_PORT": "8100",
           "SAGE_DEBUG_BACKEND": "vllm", "SAGE_DEBUG_FINETUNE_MODEL": "demo_poet"}
    s = Settings.from_env(env)
    assert s.home == tmp_path / "h" and s.finetune_root == tmp_path / "h" / "finetune_output"
    assert s.keep_alive == 300.0 and s.port == 8100
    assert s.vllm_args == ("--enforce-eager", "--max-model-len", "1024")
    assert (s.debug_backend, s.debug_finetune_model) == ("vllm", "demo_poet")
    assert Settings.from_env(env, home=str(tmp_path / "other")).home == tmp_path / "other"


def test_non_numeric_env_is_a_clear_error() -> None:
    with pytest.raises(SageError, match="SAGE_READY_TIMEOUT"):
        Settings.from_env({"SAGE_READY_TIMEOUT": "long"})
