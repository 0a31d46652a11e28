"""The catalog finds fine-tunes the SAGE way and refuses, clearly, the ones that cannot be served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sage_magic.catalog import check_adapter, get_finetune, list_finetunes
from sage_magic.errors import IncompatibleAdapter, NotFound, SageError
from tests.conftest import make_settings


@pytest.fixture
def home(demo_home: Path, tmp_path: Path) -> Path:
    """A private copy of the demo home that a test may damage."""
    copy = tmp_path / "home"
    shutil.copytree(demo_home, copy, ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    return copy


def test_lists_demo_finetunes_with_base_rank_and_numeric_checkpoint(home: Path, tmp_path: Path) -> None:
    entries = {e.name: e.as_dict() for e in list_finetunes(make_settings(home, tmp_path / "run"))}
    assert set(entries) == {"demo_expert", "demo_poet"}
    for row in entries.values():
        assert row["problem"] is None
        assert row["base"] == "sage-demo-base"
        assert row["rank"] == 8
        assert row["base_path"] == str((home / "models" / "sage-demo-base").resolve())
    # checkpoint-40 sorts before checkpoint-5 as text; the newest is 40 as a number
    names = sorted(p.name for p in (home / "finetune_output/demo_expert/checkpoints").iterdir())
    assert names[0] < names[-1] and entries["demo_expert"]["newest_checkpoint"] == max(
        int(n.split("-")[1]) for n in names)


def test_newest_checkpoint_is_served_when_there_is_no_final_adapter(home: Path, tmp_path: Path) -> None:
    root = home / "finetune_output" / "demo_expert"
    shutil.rmtree(root / "lora_weights")
    ft = get_finetune(make_settings(home, tmp_path / "run"), "demo_expert")
    assert ft.adapter_dir == root / "checkpoints" / f"checkpoint-{ft.newest_checkpoint}"
    assert ft.newest_checkpoint == max(n for n, _ in ft.checkpoints)


def test_unknown_name_lists_the_known_ones(home: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as error:
        get_finetune(make_settings(home, tmp_path / "run"), "demo_expret")
    assert "demo_expert" in str(error.value) and "demo_poet" in str(error.value)


def test_missing_base_says_where_it_looked_and_how_to_map_it(home: Path, tmp_path: Path) -> None:
    meta = home / "finetune_output/demo_poet/finetune_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": "acme/llama-70b"}))
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(NotFound) as error:
        get_finetune(settings, "demo_poet")
    assert "acme/llama-70b" in str(error.value) and "models.json" in str(error.value)
    # the documented fix works: map the name to a local folder
    (home / "models.json").write_text(json.dumps({"acme/llama-70b": str(home / "models/sage-demo-base")}))
    assert get_finetune(settings, "demo_poet").base_path == (home / "models/sage-demo-base").resolve()


def test_unreadable_meta_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    (home / "finetune_output/demo_poet/finetune_meta.json").write_text("{not json")
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(SageError) as error:
        get_finetune(settings, "demo_poet")
    assert "cannot be read" in str(error.value)
    problems = {e.name: e.problem for e in list_finetunes(settings)}
    assert problems["demo_expert"] is None and "cannot be read" in problems["demo_poet"]


def test_adapter_of_another_architecture_is_refused(home: Path, tmp_path: Path) -> None:
    other = home / "models" / "wider-base"
    shutil.copytree(home / "models" / "sage-demo-base", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 256, "intermediate_size": 512,
                                                   "head_dim": 64}))
    meta = home / "finetune_output/demo_poet/finetune_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": "wider-base"}))
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(IncompatibleAdapter) as error:
        check_adapter(settings, get_finetune(settings, "demo_poet"))
    assert "does not fit" in str(error.value) or "trained on" in str(error.value)


def test_adapter_trained_on_another_local_base_is_refused(home: Path, tmp_path: Path) -> None:
    shutil.copytree(home / "models" / "sage-demo-base", home / "models" / "other-base")
    meta = home / "finetune_output/demo_poet/finetune_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": "other-base"}))
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(IncompatibleAdapter) as error:
        check_adapter(settings, get_finetune(settings, "demo_poet"))
    assert "trained on 'sage-demo-base'" in str(error.value)


def test_rank_above_the_server_limit_says_what_to_raise(home: Path, tmp_path: Path) -> None:
    settings = make_settings(home, tmp_path / "run", max_lora_rank=4)
    with pytest.raises(IncompatibleAdapter) as error:
        check_adapter(settings, get_finetune(settings, "demo_expert"))
    assert "rank 8" in str(error.value) and "SAGE_MAX_LORA_RANK" in str(error.value)

