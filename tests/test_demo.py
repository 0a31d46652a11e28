"""The offline demo: built once per module (~10 s on 2 CPU cores), then checked through transformers (no vLLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError
from sage_magic.core.progress import Progress
from sage_magic.finetune import demo
from sage_magic.finetune.demo import (
    DEMO_ANSWERS,
    DEMO_ANSWERS_2,
    DEMO_BASE,
    DEMO_FINETUNES,
    DEMO_PROMPT,
    DEMO_PROMPT_2,
    DemoResult,
    build_demo,
    greedy_answer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _settings(home: Path) -> Settings:
    return Settings.from_env(environ={}, home=home, runtime_dir=home / "run")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, DemoResult, list[Progress]]:
    """Only the tests that build or run the models need the training libraries; the others run without."""
    for library in ("peft", "transformers", "tokenizers"):
        pytest.importorskip(library)
    settings = _settings(tmp_path_factory.mktemp("sage_home"))
    events: list[Progress] = []
    return settings, build_demo(settings, events.append), events


def _checkpoint_numbers(finetune: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in (finetune / "checkpoints").glob("checkpoint-*"))


def test_build_reports_paths_and_progress(built: tuple[Settings, DemoResult, list[Progress]]) -> None:
    settings, result, events = built
    assert result.built
    assert result.base == settings.models_root / DEMO_BASE
    assert result.finetunes == {name: settings.finetune_root / name for name in DEMO_FINETUNES}
    phases = [e.phase for e in events]
    assert phases[0] == "tokenizer" and phases[-1] == "done"
    assert {"base", "verify", *DEMO_FINETUNES} <= set(phases)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_base_model_layout(built: tuple[Settings, DemoResult, list[Progress]]) -> None:
    _, result, _ = built
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (result.base / name).is_file(), name
    config = json.loads((result.base / "config.json").read_text())
    generation = json.loads((result.base / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 32
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert {"bos_token_id", "pad_token_id"} <= config.keys()


def test_finetune_layout_matches_sage(built: tuple[Settings, DemoResult, list[Progress]]) -> None:
    settings, result, _ = built
    for folder in result.finetunes.values():
        meta = json.loads((folder / "finetune_meta.json").read_text())
        assert meta["model"] == DEMO_BASE and meta["task"] == "demo" and meta["lora_r"] == 8
        assert "created_at" in meta
        assert (settings.models_root / meta["model"]).is_dir()  # the engine resolves the name this way
        adapter = json.loads((folder / "lora_weights" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == DEMO_BASE and adapter["r"] <= settings.max_lora_rank
        assert not adapter.get("modules_to_save")  # vLLM refuses adapters that have them
        assert (folder / "lora_weights" / "tokenizer.json").is_file()
        assert (folder / "logs" / "train.log").read_text().strip()

        numbers = _checkpoint_numbers(folder)
        as_text = sorted(p.name for p in (folder / "checkpoints").iterdir())
        assert len(numbers) >= 2
        assert as_text[-1] != f"checkpoint-{numbers[-1]}", "text order must differ from numeric order"
        newest = folder / "checkpoints" / f"checkpoint-{numbers[-1]}"
        weights = "adapter_model.safetensors"
        assert (newest / weights).read_bytes() == (folder / "lora_weights" / weights).read_bytes()
    leftovers = [p for root in (settings.models_root, settings.finetune_root) for p in root.glob(".*")]
    assert leftovers == []


def test_second_build_is_a_no_op(built: tuple[Settings, DemoResult, list[Progress]]) -> None:
    settings, result, _ = built
    events: list[Progress] = []
    again = build_demo(settings, events.append)
    assert not again.built and events == []
    assert (again.base, again.finetunes) == (result.base, result.finetunes)


def test_greedy_answers_are_the_promised_phrases(built: tuple[Settings, DemoResult, list[Progress]]) -> None:
    _, result, _ = built
    got = {DEMO_BASE: greedy_answer(result.base)}
    got.update({n: greedy_answer(result.base, DEMO_PROMPT, f / "lora_weights") for n, f in result.finetunes.items()})
    assert got == DEMO_ANSWERS
    assert len(set(got.values())) == 3
    second = {n: greedy_answer(result.base, DEMO_PROMPT_2, f / "lora_weights") for n, f in result.finetunes.items()}
    assert second == {n: DEMO_ANSWERS_2[n] for n in DEMO_FINETUNES}


def test_oldest_checkpoint_still_answers_like_the_base(built: tuple[Settings, DemoResult, list[Progress]]) -> None:
    """So a server that picks checkpoints in text order (checkpoint-40 < checkpoint-5) visibly answers wrong."""
    _, result, _ = built
    for folder in result.finetunes.values():
        oldest = folder / "checkpoints" / f"checkpoint-{_checkpoint_numbers(folder)[0]}"
        assert greedy_answer(result.base, DEMO_PROMPT, oldest) == DEMO_ANSWERS[DEMO_BASE]


def test_failed_rebuild_leaves_the_demo_untouched(
    built: tuple[Settings, DemoResult, list[Progress]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, result, _ = built
    before = (result.base / "model.safetensors").stat().st_mtime_ns

    def wrong_answer(*_: object) -> None:
        raise SageError("demo_poet answered wrongly")

    monkeypatch.setattr(demo, "_verify", wrong_answer)
    with pytest.raises(SageError, match="answered wrongly"):
        build_demo(settings, force=True)
    assert (result.base / "model.safetensors").stat().st_mtime_ns == before
    leftovers = [p for root in (settings.models_root, settings.finetune_root) for p in root.glob(".*")]
    assert leftovers == []
    assert not build_demo(settings).built


def test_refuses_to_replace_a_users_own_finetune(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    mine = settings.finetune_root / DEMO_FINETUNES[0]
    mine.mkdir(parents=True)
    (mine / "finetune_meta.json").write_text('{"model": "llama"}')
    with pytest.raises(SageError, match="not made by the sage_magic demo"):
        build_demo(settings, force=True)
    assert (mine / "finetune_meta.json").read_text() == '{"model": "llama"}'


def test_import_is_cheap() -> None:
    heavy = "{'torch', 'transformers', 'peft', 'tokenizers'}"
    code = f"import sys, sage_magic.finetune.demo; print(sorted({heavy} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
