"""The training child: LoRA fine-tuning with TRL's SFTTrainer (see ``engine``), in a process of its own.

Why a child: torch, transformers, peft and TRL cost ~1 GB and seconds to import, and a notebook kernel must
stay light and interruptible. ``sage_magic.finetune.train.train`` starts ``python -m sage_magic.finetune.worker``
(or torchrun, which starts several), names the job's JSON file in SAGE_TRAIN_JOB and keeps the child's stdin
open: a ``stop`` line asks for a clean stop after the current step. EOF, or SIGTERM (PR_SET_PDEATHSIG, set by
the parent, sends it even to a child stuck inside torch; torchrun passes it on), means the kernel is gone: the
child stops after its current step too and saves it, so a kernel death loses no step, then exits; with nothing
new to save (no step since the last checkpoint, or a new run not in place yet) it exits at once, and past the
stop's grace (:func:`~sage_magic.finetune.train.stop_grace`) it exits whatever it is doing. Events go back as
JSON lines on the original stdout (dropped once the caller is gone); anything a library prints is sent to
stderr, which the parent keeps as the log.

Progress, checkpoints and stops go through one ``TrainerCallback`` (:class:`Events`): a progress event per
logged step (at most every :data:`EVENT_INTERVAL` s, and always at a checkpoint and the last step) with step,
epoch, ETA and train/eval loss; a stop sets ``should_training_stop`` after the current step, and
``should_save`` too once the run has a checkpoint in place, so ``--resume`` continues from exactly there.

Files are written the way a reader (a vLLM server, ``sage finetune list``) can trust at any moment: the
Trainer writes each checkpoint into a hidden scratch folder beside NAME/, and the callback renames it into
``checkpoints/checkpoint-N`` once complete (adapter, tokenizer, optimizer, scheduler, RNG and trainer
state: the Trainer's own resume reads them); ``finetune_meta.json`` is replaced atomically, and
``lora_weights/`` appears only when the training finished. A stop or a kill leaves the last complete
checkpoint usable.

A new run (or an ``--overwrite``) trains into a hidden staging sibling of ``NAME/`` and renames it into place
at its first complete checkpoint: until then an old fine-tune of that name stays intact and servable, and a
stop leaves it as it was (no checkpoint is made for it). A crash or a kill leaves only hidden siblings, which
the parent sweeps once the child is gone, or the next run if the parent died too (both under the training
lock).

Several processes (torchrun): the rank comes from the environment; the first process of each machine emits
events to its caller (so the cell shows one progress bar and one loss curve, and a helper machine's caller
sees the run too), rank 0 alone moves checkpoints into place (the Trainer saves on rank 0 only), and a stop
asked of any rank (the stdin they share delivers a ``stop`` line to one) is agreed on at every step, so all
ranks stop at the same step. EOF reaches every rank, and so does the SIGTERM torchrun sends when it dies.

Test hook: ``SAGE_TEST_STEP_SLEEP=SECONDS`` sleeps that long in every step, to stand for a model whose steps
are slow (a 1B+ model on CPU) in the stop tests; nothing else reads it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..core.errors import SageError
from ..core.files import utc_now, write_json_atomic
from ..core.processes import die_with_parent
from ..core.staging import leftovers, publish, staging, sweep_leftovers
from ..tracking import training as tracking
from .catalog import META_FILE
from .engine import (
    TRAINING_STATE_FILES,
    Example,
    encode_chat,
    lora_model,
    packed_length,
    prompt_ids,
    sft_config,
    sft_trainer,
    torch_session,
)
from .launch import JOB_ENV
from .train import stop_grace

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

#: Progress events at most this often (a tiny model does hundreds of steps a second).
EVENT_INTERVAL = 0.2


def rank() -> int:
    """This process's rank under torchrun (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: the first of each machine reports to that machine's caller."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_platform(opt: dict[str, Any]) -> None:
    """What this machine cannot do, said before anything loads (a model load can take minutes)."""
    import torch

    cuda = torch.cuda.is_available()
    if opt["load_in_4bit"] and not (cuda and importlib.util.find_spec("bitsandbytes")):
        missing = "a CUDA GPU" if not cuda else "bitsandbytes (pip install 'sage-magic[gpu]' or bitsandbytes)"
        raise SageError(f"--load-in-4bit (QLoRA) needs {missing}, which this training process does not have. "
                        "Leave out --load-in-4bit to train the adapter on the full-precision base; nothing was "
                        "loaded or trained.")
    if opt["precision"] == "fp16" and not cuda:
        raise SageError("--precision fp16 needs a CUDA GPU; on a CPU use --precision fp32 (or auto, the same "
                        "there) or bf16. Nothing was trained.")
    if opt["precision"] == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise SageError("--precision bf16 needs a GPU with bfloat16 (Ampere or newer); this one has none. Use "
                        "--precision fp16 or fp32. Nothing was trained.")
    if opt["deepspeed"] and not importlib.util.find_spec("deepspeed"):
        raise SageError(f"--deepspeed {opt['deepspeed']} needs DeepSpeed, which is not installed in the training "
                        "environment (pip install deepspeed, on a machine with CUDA). Leave out --deepspeed to "
                        "train without it. Nothing was trained.")
    if opt["fsdp"] and world_size() < 2:
        raise SageError("--fsdp shards the model over several processes, and this training runs in one. Start it "
                        "in several processes, or leave out --fsdp. Nothing was trained.")


def precision(choice: str) -> str:
    """``auto``: bf16 mixed precision where the GPU has it, else fp32 (a CPU, an older GPU)."""
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _everyone(flag: bool, device: Any) -> bool:
    """True on every rank when it is True on any (one rank's stop must stop all at the same step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _events_class() -> type:
    """The callback class, made on first use: ``transformers`` is imported in the child only."""
    from transformers import TrainerCallback

    class Events(TrainerCallback):
        """Progress events, checkpoints moved into place, and the stop (see the module docstring)."""

        def __init__(self, run: Run) -> None:
            self.run = run
            self.began = self.step_began = time.monotonic()
            self.start = 0
            self.last_event = 0.0
            self.loss: float | None = None
            self.eval_loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.began, self.start = time.monotonic(), state.global_step

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_began = time.monotonic()
            self.eval_loss = None
            if self.run.step_sleep:
                time.sleep(self.run.step_sleep)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.run.unsaved = True
            if _everyone(self.run.stop.is_set(), args.device):
                self.run.stopped = True
                control.should_training_stop = True
                # A run not yet in place has no checkpoint to continue: stopping it leaves NAME/ as it was. Asked
                # of every rank alike (saving is collective): only rank 0 knows where NAME/ is.
                control.should_save = control.should_save or self.run.in_place
            if state.global_step >= state.max_steps:
                control.should_save = True
                control.should_evaluate = self.run.eval_rows > 0

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.loss = float(logs["loss"])
                if not (control.should_save or control.should_evaluate):
                    self.report(state, force=False)
            if "eval_loss" in logs:
                self.eval_loss = float(logs["eval_loss"])

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.run.in_place, self.run.unsaved = True, False
            _barrier()  # every rank has written its part (its RNG state) before rank 0 moves the folder
            if state.is_world_process_zero:
                self.run.place_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                          state.global_step, state.max_steps)
            self.report(state, force=True)

        def report(self, state: Any, force: bool) -> None:
            now = time.monotonic()
            self.run.slowest_step = max(self.run.slowest_step, now - self.step_began)  # with eval and save
            if self.loss is None or not state.is_local_process_zero:
                return
            if not (force or now - self.last_event >= EVENT_INTERVAL or state.global_step >= state.max_steps):
                return
            self.last_event = now
            step, total = state.global_step, state.max_steps
            rate = (step - self.start) / max(now - self.began, 1e-9)
            eta = (total - step) / rate if rate > 0 else None
            epoch = max(1, math.ceil(round(state.epoch or 0, 6)))
            self.run.progress(
                "train", f"step {step}/{total}, epoch {epoch}, loss {self.loss:.4f}"
                + (f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else "")
                + (f", ETA {eta:.0f} s" if eta is not None else ""),
                step / total, step=step, total_steps=total, epoch=epoch, loss=self.loss, eval_loss=self.eval_loss,
                eta_s=eta, steps_per_s=rate, step_s=self.run.slowest_step)

    return Events


# --- one training run -------------------------------------------------------------------------------------


class Run:
    """One fine-tuning job as sent by the parent (see ``sage_magic.finetune.train._job`` for its fields)."""

    def __init__(self, job: dict[str, Any], emit: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
        self.job = job
        self.opt = job["options"]
        self.root = Path(job["root"])
        self.emit = emit if local_rank() == 0 else (lambda event: None)
        self.stop = stop
        self.stopped = False
        self.eval_rows = 0
        self.checkpoints: list[int] = []
        #: Where this run writes: ``root`` itself when resuming, else a hidden staging sibling until the first
        #: checkpoint is complete, when it is renamed to ``root`` (see ``place_checkpoint``).
        self.out = self.root
        #: Where the Trainer saves; each checkpoint is moved from there into place once complete. Made by the
        #: parent, so that every process of this machine saves its part (its RNG state) into the same folder.
        self.scratch = Path(job["scratch"])
        self.slowest_step = 0.0
        #: Whether NAME/ holds a checkpoint of this run (resumed, or one saved), known alike on every rank.
        self.in_place = bool(job["resume"])
        #: Whether steps were taken since this run's newest checkpoint (what a caller's death would lose).
        self.unsaved = False
        self.orphan = False
        self.trainer: Any = None
        self.step_sleep = float(os.environ.get("SAGE_TEST_STEP_SLEEP") or 0)  # test hook, see the docstring

    def orphaned(self) -> None:
        """The caller is gone: stop after the current step and save it, if there is anything to save (see the
        module docstring); exit at once otherwise, or when the stop takes longer than its grace."""
        if self.orphan:
            return
        self.orphan = True
        if not (self.in_place and self.unsaved):
            os._exit(3)
        self.stop.set()
        deadline = threading.Timer(stop_grace(self.slowest_step), os._exit, args=(3,))
        deadline.daemon = True
        deadline.start()

    def progress(self, phase: str, message: str, fraction: float | None = None, **data: Any) -> None:
        self.emit({"event": "progress", "phase": phase, "message": message, "fraction": fraction,
                   "data": data or None})

    def run(self) -> dict[str, Any]:
        if self.job["resume"]:
            return self.train()
        # A new folder is built beside NAME/ and removed here unless its first checkpoint renamed it into place.
        with staging(self.root) as self.out:
            return self.train()

    def train(self) -> dict[str, Any]:
        from transformers import AutoTokenizer

        check_platform(self.opt)
        self.progress("load", f"Loading the tokenizer of {self.job['base_ref']}")
        tokenizer = AutoTokenizer.from_pretrained(self.job["base_path"])
        if not getattr(tokenizer, "chat_template", None):
            raise SageError(f"The base model {self.job['base_ref']!r} has no chat template, so a chat request "
                            "could never match what is trained. Use an instruct/chat model as the base.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        examples = self.encode(tokenizer)
        train_rows, eval_rows = self.split(examples)
        self.eval_rows = len(eval_rows)
        resume_from = self.prepare_folder()
        mode = precision(self.opt["precision"])
        model = self.load_model(mode, resume_from)
        total = self.total_steps(packed_length(train_rows, self.opt["max_length"]) if self.opt["packing"]
                                 else len(train_rows))
        tracking.prepare(self.job["report_to"], self.out, rank() == 0)
        trainer = self.trainer = sft_trainer(model, tokenizer, self.config(total, mode), train_rows, eval_rows,
                                             [_events_class()(self)])
        self.progress("load", f"Training {self.job['base_ref']} on {trainer.args.device} ({mode})")
        began = time.monotonic()
        trainer.train(resume_from_checkpoint=resume_from)
        history = trainer.state.log_history
        losses = [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h]
        eval_losses = [(int(h["step"]), float(h["eval_loss"])) for h in history if "eval_loss" in h]
        steps = trainer.state.global_step
        if rank() == 0:
            if not self.stopped:
                self.publish_final(tokenizer, losses, eval_losses)
            elif self.out == self.root:  # with no checkpoint yet, the staging folder goes: NAME/ is as it was
                self.write_meta("stopped", steps)
        return {"stopped": self.stopped, "steps": steps, "total_steps": total, "losses": losses,
                "eval_losses": eval_losses, "checkpoints": self.checkpoints, "device": str(trainer.args.device),
                "seconds": time.monotonic() - began,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "train_rows": len(train_rows), "eval_rows": len(eval_rows)}

    def load_model(self, mode: str, resume_from: str | None) -> Any:
        """The base in the run's precision, with a fresh LoRA (or the checkpoint's, to resume) in fp32."""
        import torch
        from transformers import AutoModelForCausalLM

        self.progress("load", f"Loading {self.job['base_ref']}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.opt["load_in_4bit"]:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float16 if mode == "fp16" else torch.bfloat16)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        base = AutoModelForCausalLM.from_pretrained(self.job["base_path"], **kwargs)
        if self.opt["load_in_4bit"]:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=self.opt["gradient_checkpointing"])
        if resume_from is not None:
            from peft import PeftModel

            return PeftModel.from_pretrained(base, resume_from, is_trainable=True)
        return lora_model(base, self.opt["rank"], self.opt["alpha"], self.opt["target_modules"], self.job["base_ref"])

    def total_steps(self, sequences: int) -> int:
        """Optimizer steps of the run: ``--max-steps``, else the epochs over this process's share of the
        sequences (the rows, or with ``--packing`` what they are packed into)."""
        if self.opt["max_steps"]:
            return int(self.opt["max_steps"])
        batches = math.ceil(math.ceil(sequences / world_size()) / self.opt["batch_size"])
        return self.opt["epochs"] * max(1, math.ceil(batches / self.opt["grad_accum"]))

    def config(self, total: int, mode: str) -> Any:
        opt = self.opt
        every = opt["save_every"]
        return sft_config(
            self.scratch, steps=total, batch_size=opt["batch_size"], lr=opt["lr"], seed=opt["seed"],
            gradient_accumulation_steps=opt["grad_accum"], lr_scheduler_type=opt["lr_scheduler"],
            warmup_steps=math.ceil(opt["warmup_ratio"] * total), weight_decay=opt["weight_decay"],
            bf16=mode == "bf16", fp16=mode == "fp16", gradient_checkpointing=opt["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False}, packing=opt["packing"],
            max_length=opt["max_length"] if opt["packing"] else None, deepspeed=opt["deepspeed"],
            fsdp="full_shard auto_wrap" if opt["fsdp"] else "", save_strategy="steps", save_steps=every,
            eval_strategy="steps" if self.eval_rows else "no", eval_steps=every, run_name=self.job["name"],
            report_to=list(self.job["report_to"]))

    def encode(self, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
        """Tokenize every row through the chat template, refusing rows that do not fit before any step."""
        limit = self.opt["max_length"]
        encoded = []
        for number, messages in zip(self.job["row_numbers"], self.job["examples"]):
            ids, labels = encode_chat(tokenizer, messages)
            if len(ids) > limit:
                prompt = len(prompt_ids(tokenizer, messages[:-1]))
                raise SageError(
                    f"Row {number} is {len(ids)} tokens long with the chat template ({prompt} of them the prompt), "
                    f"more than --max-length {limit}. Shorten that row or raise --max-length; nothing was trained.")
            encoded.append((ids, labels))
        self.progress("tokenize", f"{len(encoded)} rows tokenized, longest {max(len(i) for i, _ in encoded)} "
                                  "tokens")
        return encoded

    def split(self, examples: list[Example]) -> tuple[list[Example], list[Example]]:
        count = self.job["eval_rows"]
        order = list(range(len(examples)))
        random.Random(self.opt["seed"]).shuffle(order)
        held = set(order[:count])
        return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])

    def prepare_folder(self) -> str | None:
        """Make the output folder ready: a fresh staging folder for a new run or an overwrite (a crashed run's
        hidden siblings are swept first), or NAME/ itself and the checkpoint to resume."""
        if rank() != 0:
            return self.job["resume_from"]["folder"] if self.job["resume"] else None
        for leftover in leftovers(self.root):
            if leftover not in (self.out, self.scratch):
                shutil.rmtree(leftover, ignore_errors=True)
        if not self.job["resume"]:
            (self.out / "checkpoints").mkdir()
            self.write_meta("training", 0)
            return None
        checkpoints = self.root / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        for leftover in checkpoints.glob(".checkpoint-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a killed run's half-built checkpoint
        sweep_leftovers(self.root / "lora_weights")
        state = self.job["resume_from"]
        shutil.rmtree(self.root / "lora_weights", ignore_errors=True)  # only a finished run has one
        self.checkpoints = list(self.job["existing_checkpoints"])
        self.write_meta("training", state["step"])
        return state["folder"]

    def place_checkpoint(self, saved: Path, step: int, total: int) -> None:
        """Move the Trainer's complete checkpoint into ``checkpoints/checkpoint-N`` (one rename), and the whole
        new fine-tune into place at its first checkpoint."""
        target = self.out / "checkpoints" / f"checkpoint-{step}"
        publish(saved, target)
        if step not in self.checkpoints:
            self.checkpoints.append(step)
        self.write_meta("training", step)
        if self.out != self.root:  # the first complete checkpoint: the new fine-tune replaces the old one now
            tracking.follow_move(self.trainer, self.out, self.root)
            publish(self.out, self.root)
            self.out = self.root
        self.progress("checkpoint", f"checkpoint-{step} saved", step / total, step=step)

    def publish_final(self, tokenizer: Any, losses: list[tuple[int, float]],
                      eval_losses: list[tuple[int, float]]) -> None:
        """lora_weights/ = the last checkpoint's adapter plus the tokenizer; then the log and the final meta."""
        newest = self.out / "checkpoints" / f"checkpoint-{max(self.checkpoints)}"
        target = self.root / "lora_weights"
        with staging(target) as tmp:
            for item in newest.iterdir():
                if item.is_file() and item.name not in TRAINING_STATE_FILES and not item.name.startswith("rng_state"):
                    shutil.copy2(item, tmp / item.name)
            tokenizer.save_pretrained(tmp)
            publish(tmp, target)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        opt = self.opt
        lines = [f"{utc_now()} LoRA r={opt['rank']} alpha={opt['alpha']} on {self.job['base_ref']}, lr={opt['lr']} "
                 f"({opt['lr_scheduler']}), batch={opt['batch_size']} x {opt['grad_accum']} accumulated"]
        lines += [f"step {s} loss {loss:.4f}" for s, loss in losses]
        lines += [f"step {s} eval_loss {loss:.4f}" for s, loss in eval_losses]
        (logs / "train.log").write_text("\n".join(lines) + "\n")
        self.write_meta("done", max(self.checkpoints))

    def write_meta(self, status: str, steps: int) -> None:
        opt = self.opt
        meta = {"model": self.job["base_ref"], "task": "sft", "status": status, "updated_at": utc_now(),
                "lora_r": opt["rank"], "lora_alpha": opt["alpha"],
                "target_modules": opt["target_modules"] or "all-linear", "learning_rate": opt["lr"],
                "lr_scheduler": opt["lr_scheduler"], "batch_size": opt["batch_size"], "grad_accum": opt["grad_accum"],
                "max_length": opt["max_length"], "precision": opt["precision"], "seed": opt["seed"], "steps": steps,
                "rows": len(self.job["examples"])}
        write_json_atomic(self.out / META_FILE, meta, mode=0o644)


# --- the process ------------------------------------------------------------------------------------------


def _watch_stdin(run: Run) -> None:
    """``stop`` lines ask for a clean stop; EOF means the parent died (:meth:`Run.orphaned`)."""
    for line in sys.stdin:
        if line.strip() == "stop":
            run.stop.set()
    run.orphaned()


def main() -> int:
    events: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to the log, never into the event stream
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            try:
                events.write(json.dumps(event) + "\n")
            except OSError:  # the caller is gone (a broken pipe): the run still ends as it should
                pass

    die_with_parent()  # under torchrun, the parent is torchrun, which the caller's death signal reaches
    job = json.loads(Path(os.environ[JOB_ENV]).read_text())
    run = Run(job, emit, threading.Event())
    signal.signal(signal.SIGTERM, lambda *_: run.orphaned())
    threading.Thread(target=_watch_stdin, args=(run,), daemon=True).start()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with torch_session(job["options"]["seed"]):
            result = run.run()
    except SageError as error:
        emit({"event": "error", "message": str(error)})
        return 2
    run.emit({"event": "done", "result": result})  # the first process of this machine's: the others know no checkpoint
    return 0


if __name__ == "__main__":
    sys.exit(main())
