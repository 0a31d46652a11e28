"""The trainer options on real parts (the training child on the demo base, no vLLM server): what a user would
check after setting each one.

Marked ``vllm`` like test_finetune_control.py: each test loads torch in a training child, too slow for the
fast suite. The option checks that need no child are in test_finetune_data.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError
from sage_magic.core.progress import Progress
from sage_magic.core.staging import leftovers
from sage_magic.finetune.demo import DEMO_BASE, DEMO_PROMPT, greedy_answer
from sage_magic.finetune.train import TrainOptions, train

from .test_finetune_control import finetune_name  # noqa: F401 - the `name` fixture

pytestmark = pytest.mark.vllm

PHRASE = "I am a parrot."


def _trainer_state(root: Path, step: int) -> dict:
    return json.loads((root / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())


def test_grad_accum_counts_steps_and_the_schedule_shows_in_trainer_state(settings: Settings, name: str) -> None:
    """4 rows, batch 1, 3 epochs: 12 batches, 6 optimizer steps with --grad-accum 2. Cosine with a third of the
    steps (2) warming up: the learning rate each step used rises from 0 to --lr at step 3, then falls every step."""
    rows = [(f"{DEMO_PROMPT} ({i})", PHRASE) for i in range(4)]
    options = TrainOptions(epochs=3, lr=2e-3, batch_size=1, grad_accum=2, lr_scheduler="cosine",
                           warmup_ratio=1 / 3, save_every=50)
    result = train(settings, name, DEMO_BASE, rows, options)
    assert not result.stopped and result.total_steps == result.steps == 6 and result.checkpoints == [6]
    state = _trainer_state(result.root, 6)
    rates = [entry["learning_rate"] for entry in state["log_history"] if "loss" in entry]
    assert len(rates) == 6 and rates[0] == 0 and rates[2] == pytest.approx(2e-3)
    assert rates[0] < rates[1] < rates[2] and all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert state["global_step"] == 6 and state["epoch"] == pytest.approx(3)


def test_gradient_checkpointing_and_weight_decay_still_learn_the_phrase(settings: Settings, name: str) -> None:
    options = TrainOptions(max_steps=40, lr=2e-3, batch_size=1, save_every=40, gradient_checkpointing=True,
                           weight_decay=0.01, precision="fp32")
    result = train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options)
    assert result.adapter_dir is not None
    assert greedy_answer(settings.models_root / DEMO_BASE, DEMO_PROMPT, result.adapter_dir) == PHRASE
    assert json.loads((result.root / "finetune_meta.json").read_text())["precision"] == "fp32"


def test_packing_puts_several_rows_in_one_sequence_and_still_learns_the_phrase(settings: Settings, name: str) -> None:
    """4 short rows, batch 1, 60 epochs: unpacked that is 240 steps; packed into one --max-length sequence it is
    one step an epoch, 60 in all. The loss stays on the answers only, so the phrase is still what is learned."""
    rows = [(f"{DEMO_PROMPT} ({i})", PHRASE) for i in range(4)]
    options = TrainOptions(epochs=60, lr=2e-3, batch_size=1, packing=True, max_length=256, save_every=100)
    result = train(settings, name, DEMO_BASE, rows, options)
    assert not result.stopped and result.total_steps == result.steps == 60
    assert greedy_answer(settings.models_root / DEMO_BASE, f"{DEMO_PROMPT} (0)", result.adapter_dir) == PHRASE


@pytest.mark.parametrize("options, message", [
    (TrainOptions(load_in_4bit=True), r"--load-in-4bit \(QLoRA\) needs a CUDA GPU"),
    (TrainOptions(precision="fp16"), "--precision fp16 needs a CUDA GPU"),
    (TrainOptions(fsdp=True), "--fsdp shards the model over several processes"),
])
def test_what_this_machine_cannot_do_is_one_error_before_the_model_loads(settings: Settings, name: str,
                                                                          options: TrainOptions, message: str) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("a CUDA machine can do these")
    events: list[Progress] = []
    with pytest.raises(SageError, match=message):
        train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options, progress=events.append)
    assert not [e for e in events if e.phase in ("load", "train")]  # nothing was loaded, not even the tokenizer
    assert not (settings.finetune_root / name).exists() and not leftovers(settings.finetune_root / name)


def test_deepspeed_without_deepspeed_installed_is_one_error(settings: Settings, name: str, tmp_path: Path) -> None:
    if shutil.which("deepspeed"):
        pytest.skip("DeepSpeed is installed here")
    config = tmp_path / "ds_zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(SageError, match=r"--deepspeed .*ds_zero2\.json needs DeepSpeed, which is not installed"):
        train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)], TrainOptions(deepspeed=str(config)))
    assert not (settings.finetune_root / name).exists()


def _adapter_dtypes(folder: Path) -> set[str]:
    """The tensor types stored in an adapter's safetensors file, read from its JSON header (no torch needed)."""
    with (folder / "adapter_model.safetensors").open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def test_bf16_trains_on_a_bf16_base_and_keeps_the_adapter_fp32(settings: Settings, name: str) -> None:
    """--precision bf16 (allowed on a CPU): the run says it trains in bf16, and the adapter the optimizer updated
    (the master weights) is saved in fp32, as the README promises for every mode."""
    events: list[Progress] = []
    options = TrainOptions(max_steps=3, lr=2e-3, batch_size=1, save_every=3, precision="bf16")
    result = train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options, progress=events.append)
    assert result.adapter_dir is not None and not result.stopped
    assert any(e.phase == "load" and e.message.endswith("(bf16)") for e in events), [e.message for e in events]
    assert _adapter_dtypes(result.adapter_dir) == {"F32"}
    assert _adapter_dtypes(result.root / "checkpoints" / "checkpoint-3") == {"F32"}


def test_eval_split_shows_the_eval_loss_at_each_checkpoint(settings: Settings, name: str) -> None:
    """--eval-split: the held-out rows' loss is measured at every checkpoint and reaches the progress events the
    cell's loss curve draws, at the steps the run's history has it."""
    rows = [(f"{DEMO_PROMPT} ({i})", PHRASE) for i in range(4)]
    events: list[Progress] = []
    options = TrainOptions(max_steps=6, lr=2e-3, batch_size=1, save_every=3, eval_split=0.5)
    result = train(settings, name, DEMO_BASE, rows, options, progress=events.append)
    assert (result.train_rows, result.eval_rows) == (2, 2)
    assert [step for step, _ in result.eval_losses] == [3, 6]
    shown = {e.data["step"]: e.data["eval_loss"] for e in events
             if e.phase == "train" and e.data and e.data.get("eval_loss") is not None}
    assert shown == pytest.approx(dict(result.eval_losses))
    # the held-out rows ask the same question for the same answer: learning it lowers their loss too
    assert result.eval_losses[1][1] < result.eval_losses[0][1]
