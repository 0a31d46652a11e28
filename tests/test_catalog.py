"""The catalog finds fine-tunes the SAGE way and refuses, clearly, the ones that cannot be served."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from sage_magic.core.errors import IncompatibleAdapter, NotFound, SageError
from sage_magic.finetune.catalog import check_adapter, get_finetune, list_finetunes
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
    # `sage finetune list` and the sidebar name the base it looks for, not "?" or null
    row = {e.name: e.as_dict() for e in list_finetunes(settings)}["demo_poet"]
    assert row["base"] == "acme/llama-70b" and "acme/llama-70b" in row["problem"]
    # the documented fix works: map the name to a local folder
    (home / "models.json").write_text(json.dumps({"acme/llama-70b": str(home / "models/sage-demo-base")}))
    assert get_finetune(settings, "demo_poet").base_path == (home / "models/sage-demo-base").resolve()


def test_unreadable_meta_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    (home / "finetune_output/demo_poet/finetune_meta.json").write_text("{not json")
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(SageError) as error:
        get_finetune(settings, "demo_poet")
    assert "cannot be read" in str(error.value)
    entries = {e.name: e for e in list_finetunes(settings)}
    assert entries["demo_expert"].problem is None and "cannot be read" in entries["demo_poet"].problem
    assert entries["demo_poet"].base is None and entries["demo_expert"].base == entries["demo_expert"].finetune.base_ref


def test_adapter_of_another_architecture_is_refused(home: Path, tmp_path: Path) -> None:
    other = home / "models" / "wider-base"
    shutil.copytree(home / "models" / "sage-demo-base", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 256, "intermediate_size": 512,
                                                   "head_dim": 64}))
    meta = home / "finetune_output/demo_poet/finetune_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": "wider-base"}))
    config = home / "finetune_output/demo_poet/lora_weights/adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "wider-base"}))
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(IncompatibleAdapter, match="does not fit") as error:  # the shape check, not "trained on"
        check_adapter(settings, get_finetune(settings, "demo_poet"))
    assert "the input size of" in str(error.value) and "256" in str(error.value)


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



def test_meta_whose_model_is_not_text_says_what_is_wrong(home: Path, tmp_path: Path) -> None:
    meta = home / "finetune_output/demo_poet/finetune_meta.json"
    settings = make_settings(home, tmp_path / "run")
    for value, said in ((5, '"model": 5, which is a number'), (None, '"model": null'), ("  ", "empty")):
        meta.write_text(json.dumps({"model": value}))
        with pytest.raises(SageError) as error:
            get_finetune(settings, "demo_poet")
        assert said in str(error.value) and "no \"model\" field" not in str(error.value), str(error.value)
    meta.write_text(json.dumps({"base": "sage-demo-base"}))
    with pytest.raises(SageError, match='has no "model" field'):
        get_finetune(settings, "demo_poet")


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A real safetensors file (8-byte header length, JSON header, then the data) of float32 zeros."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def phi3_style_finetune(home: Path, tensors: dict[str, list[int]], trained_on: str = "phi-style-base") -> str:
    """A Phi-3-like base (grouped-query attention, fused qkv_proj and gate_up_proj) and an adapter for it.

    Sizes: hidden 128, 4 heads of 32 and 2 KV heads (q 128, k/v 64, fused qkv 256), intermediate 320
    (fused gate_up 640), vocabulary 1024.
    """
    base = home / "models" / "phi-style-base"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({
        "model_type": "phi3", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 320, "vocab_size": 1024}))
    root = home / "finetune_output" / "phi_style"
    adapter = root / "lora_weights"
    adapter.mkdir(parents=True)
    (root / "finetune_meta.json").write_text(json.dumps({"model": "phi-style-base"}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": trained_on}))
    write_safetensors(adapter / "adapter_model.safetensors", tensors)
    return "phi_style"


LAYER = "base_model.model.model.layers.0"
VALID_KINDS = {
    f"{LAYER}.self_attn.qkv_proj.lora_A.weight": [8, 128],
    f"{LAYER}.self_attn.qkv_proj.lora_B.weight": [256, 8],
    f"{LAYER}.self_attn.o_proj.lora_A.weight": [8, 128],
    f"{LAYER}.self_attn.o_proj.lora_B.weight": [128, 8],
    f"{LAYER}.mlp.gate_up_proj.lora_A.weight": [8, 128],
    f"{LAYER}.mlp.gate_up_proj.lora_B.weight": [640, 8],
    f"{LAYER}.mlp.down_proj.lora_A.weight": [8, 320],
    f"{LAYER}.mlp.down_proj.lora_B.weight": [128, 8],
    "base_model.model.lm_head.lora_A.weight": [8, 128],
    "base_model.model.lm_head.lora_B.weight": [1024, 8],
    "base_model.model.model.embed_tokens.lora_embedding_A": [8, 1024],
    "base_model.model.model.embed_tokens.lora_embedding_B": [128, 8],
    "base_model.model.model.norm.weight": [128],  # a modules_to_save layer, stored whole
    "base_model.model.score.weight": [3, 128],  # a classification head in modules_to_save
}


def test_fused_lm_head_embedding_and_modules_to_save_adapters_pass(home: Path, tmp_path: Path) -> None:
    name = phi3_style_finetune(home, VALID_KINDS)
    settings = make_settings(home, tmp_path / "run")
    check_adapter(settings, get_finetune(settings, name))
    assert {e.name: e.problem for e in list_finetunes(settings)}[name] is None


@pytest.mark.parametrize("tensor, shape, said", [
    (f"{LAYER}.self_attn.qkv_proj.lora_B.weight", [384, 8], "output size of qkv_proj in the base is 256"),
    (f"{LAYER}.self_attn.qkv_proj.lora_A.weight", [8, 96], "input size of qkv_proj in the base is 128"),
    (f"{LAYER}.mlp.down_proj.lora_A.weight", [8, 256], "input size of down_proj in the base is 320"),
    ("base_model.model.lm_head.lora_A.weight", [8, 64], "input size of lm_head in the base is 128"),
    ("base_model.model.model.embed_tokens.lora_embedding_B", [96, 8], "output size of embed_tokens"),
])
def test_the_shape_check_refuses_a_layer_that_cannot_fit(home: Path, tmp_path: Path, tensor: str,
                                                         shape: list[int], said: str) -> None:
    # Trained under a name unknown here, so the "trained on" check cannot decide: the shape check must.
    name = phi3_style_finetune(home, {**VALID_KINDS, tensor: shape}, trained_on="someone/unknown-base")
    settings = make_settings(home, tmp_path / "run")
    with pytest.raises(IncompatibleAdapter, match="does not fit") as error:
        check_adapter(settings, get_finetune(settings, name))
    assert tensor in str(error.value) and said in str(error.value)
