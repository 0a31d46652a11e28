"""The training engine: TRL's ``SFTTrainer`` (the transformers Trainer stack) on rows tokenized here.

One engine for every trainer of the project: the training child (``worker``) and the demo build (``demo``)
both call :func:`sft_trainer`. Why the Trainer stack: gradient accumulation, schedules, mixed precision with
fp32 adapter weights, gradient checkpointing, QLoRA, DeepSpeed/FSDP and several processes come from the
code the field uses (TRL, LLaMA-Factory, axolotl), and its checkpoints resume exactly (optimizer, scheduler,
RNG, data position).

Why the rows are tokenized here and handed to TRL pre-tokenized (``input_ids`` plus ``completion_mask``):
each assistant turn is rendered by the base's own chat template exactly as vLLM renders the prompt when the
same question is asked through chat, every assistant turn of a conversation is learned (TRL's own
prompt/completion path learns only the last), and a row too long is refused with its number before any model
loads instead of being cut silently.

Everything heavy is imported inside functions: only the training child and the demo build pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import SageError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase, TrainerCallback

#: An example as token ids and labels (-100 where nothing is learned: prompts, padding).
Example = tuple[list[int], list[int]]
#: What a checkpoint holds beside the adapter, for resuming only (``lora_weights/`` leaves them out).
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "scaler.pt")
#: How ``--packing`` packs rows (TRL's best-fit decreasing: whole rows, padding-free, none cut in two).
PACKING_STRATEGY = "bfd"


@contextmanager
def torch_session(seed: int) -> Iterator[None]:
    """Seed torch, use the idle cores (1 to 4) and hide transformers' progress bars; all restored afterwards.

    The caller's random state is left as it was (a notebook's own experiments must not change because a
    model was trained in-process). Threads: torch's workers spin while they wait for each other, so on
    busy cores they mostly wait (measured on 2 cores at load 10, demo base: 1 thread 30 steps/s, 2 threads
    0.6-1.5 steps/s); beyond 4 they only add synchronisation cost on small models. The bars would drown our
    own progress events.
    """
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    idle = (os.cpu_count() or 1) - int(os.getloadavg()[0])
    share = idle // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes split the idle cores
    torch.set_num_threads(max(1, min(4, share)))
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


# --- tokenization ---------------------------------------------------------------------------------------


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of text as it appears inside a rendered template (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat-template prompt, tokenized exactly as vLLM does it (template text, no extra special tokens)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return text_ids(tokenizer, text)


def example(context: list[int], target: list[int]) -> Example:
    """Ids and labels for a context that is only read and a target that is learned."""
    return context + target, [-100] * len(context) + target


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> Example:
    """A conversation through the base's own chat template, learning every assistant turn and nothing else.

    Each assistant turn is the text the template adds after the generation prompt, so what is learned
    follows exactly the prompt vLLM builds when the same question is asked through chat. The turn ends
    with the end-of-sequence token (added if the template does not write it), so generation stops there.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages[:i + 1]), tokenize=False)
        if not context.startswith(rendered) or not full.startswith(context):
            raise SageError("The base model's chat template does not render conversations turn by turn, so the "
                            "answers to learn cannot be located. Train on (prompt, response) rows instead.")
        turn = full[len(context):]
        if tokenizer.eos_token and tokenizer.eos_token not in turn:
            turn += tokenizer.eos_token
        context_ids, turn_ids = text_ids(tokenizer, context[len(rendered):]), text_ids(tokenizer, turn)
        ids += context_ids + turn_ids
        labels += [-100] * len(context_ids) + turn_ids
        rendered = context + turn
    return ids, labels


def dataset(rows: Sequence[Example]) -> Any:
    """TRL's pre-tokenized form: ``input_ids`` and a ``completion_mask`` (1 where the loss is taken)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(ids) for ids, _ in rows],
                              "completion_mask": [[int(x != -100) for x in labels] for _, labels in rows]})


# --- models and the trainer --------------------------------------------------------------------------------


def lora_model(base: Any, rank: int, alpha: int, targets: Sequence[str] | None, base_ref: str) -> Any:
    """The base wrapped with fresh LoRA layers (all linear layers when ``targets`` is None).

    The adapter config names the base by ``base_ref`` (as SAGE does), which the engine resolves locally. The
    adapter's weights are fp32 whatever the base's dtype (peft's default upcast): the master weights of
    mixed-precision training.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=list(targets) if targets else "all-linear")
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = base_ref
    return model


def save_adapter(model: Any, folder: Path) -> None:
    """Save the LoRA weights; no embedding layer is trained, and saying so keeps peft off the Hub."""
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)


def sft_config(output_dir: Path, *, steps: int, batch_size: int, lr: float, seed: int, **settings: Any) -> Any:
    """An ``SFTConfig`` with the project's defaults instead of TRL's GPU ones.

    TRL defaults to bf16 and gradient checkpointing, which fail or cost on a CPU, logs every 10 steps (the
    cell's loss curve wants every step) and writes a report to the Hub's model card; all of that is set here.
    Saving, evaluation and tracking are the caller's (``settings`` override anything).
    """
    from trl import SFTConfig

    config: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=lr, seed=seed, data_seed=seed,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=not _cuda(),
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, completion_only_loss=True, max_length=None, dataloader_num_workers=0,
        prediction_loss_only=True, save_only_model=False, remove_unused_columns=True,
        packing_strategy=PACKING_STRATEGY,
    )
    config.update(settings)
    return SFTConfig(**config)


def packed_length(rows: Sequence[Example], max_length: int) -> int:
    """How many sequences of ``max_length`` tokens TRL packs ``rows`` into, counted by TRL's own packing (the
    strategy the config names): the run's step count comes from it, since ``max_steps`` is what the Trainer
    runs, and counting rows would train a packed run for several times the epochs asked."""
    from trl.data_utils import pack_dataset

    return len(pack_dataset(dataset(rows), max_length, PACKING_STRATEGY))


def sft_trainer(model: Any, tokenizer: PreTrainedTokenizerBase, config: Any, train_rows: Sequence[Example],
                eval_rows: Sequence[Example] = (), callbacks: Sequence[TrainerCallback] = ()) -> Any:
    """TRL's ``SFTTrainer`` on pre-tokenized rows (see the module docstring), with the model as given (a
    peft model already: its adapter config names the base as the SAGE layout does). The progress bar is off
    (``disable_tqdm``), so the Trainer adds its printer of log dicts, removed here."""
    from transformers import PrinterCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset(train_rows),
                         eval_dataset=dataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
                         callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # its dicts on stdout would land in a terminal or the child's log
    return trainer


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
