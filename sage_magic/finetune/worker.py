"""The training child: LoRA fine-tuning with peft and transformers, in a process of its own.

Why a child: torch, transformers and peft cost ~1 GB and seconds to import, and a notebook kernel must stay
light and interruptible. ``sage_magic.finetune.train.train`` starts ``python -m sage_magic.finetune.worker``, writes the
job as one JSON line on its stdin and keeps that pipe open: a ``stop`` line asks for a clean stop after the
current step, and EOF means the kernel is gone, so the child exits at once (PR_SET_PDEATHSIG, set by the
parent, covers a child stuck inside torch). Events go back as JSON lines on the original stdout; anything a
library prints is sent to stderr, which the parent keeps as the log.

Files are written the way a reader (a vLLM server, ``sage finetune list``) can trust at any moment: each
checkpoint is built in a hidden staging folder and renamed into place, ``finetune_meta.json`` is replaced
atomically, and ``lora_weights/`` appears only when the training finished. A stop or a kill leaves the last
complete checkpoint usable.

A new run (or an ``--overwrite``) trains into a hidden staging sibling of ``NAME/`` and renames it into place
at its first complete checkpoint: until then an old fine-tune of that name stays intact and servable, and a
stop leaves it as it was. A crash before that point leaves only the hidden sibling, which the next run sweeps
(under the parent's training lock), so neither a retrain nor ``--overwrite`` finds a half-made ``NAME/``.

Test hook: ``SAGE_TEST_STEP_SLEEP=SECONDS`` sleeps that long in every step, to stand for a model whose steps
are slow (a 1B+ model on CPU) in the stop tests; nothing else reads it.

The pieces every trainer here shares (seeded torch session, chat-template tokenization, padding, one
optimizer step, a LoRA model, saving an adapter) are public so that ``sage_magic.finetune.demo`` builds its demo
fine-tunes with them too. Heavy imports happen inside functions only.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..core.errors import SageError
from ..core.files import utc_now, write_json_atomic
from ..core.staging import leftovers, publish, staging, sweep_leftovers
from .catalog import META_FILE

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

#: An example as token ids and labels (-100 where nothing is learned: prompts, padding).
Example = tuple[list[int], list[int]]
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
#: Progress events at most this often (a tiny model does hundreds of steps a second).
EVENT_INTERVAL = 0.2


# --- the shared pieces (also used by sage_magic.finetune.demo) -----------------------------------------------------


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
    torch.set_num_threads(max(1, min(4, idle)))
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


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


def batch(rows: Sequence[Example], pad: int, device: str = "cpu") -> tuple[Any, Any, Any]:
    """Right-padded input ids, attention mask and labels."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = [i + [pad] * (width - len(i)) for i, _ in rows]
    labels = [lab + [-100] * (width - len(lab)) for _, lab in rows]
    mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in rows]
    return tuple(torch.tensor(t, device=device) for t in (ids, mask, labels))  # type: ignore[return-value]


def trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: Any, optimizer: Any, params: list[Any], tensors: tuple[Any, Any, Any]) -> float:
    """One AdamW step on one batch (gradients clipped to norm 1); returns the batch loss."""
    import torch

    ids, mask, labels = tensors
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.item())


def lora_model(base: Any, rank: int, alpha: int, targets: Sequence[str] | None, base_ref: str) -> Any:
    """The base wrapped with fresh LoRA layers (all linear layers when ``targets`` is None).

    The adapter config names the base by ``base_ref`` (as SAGE does), which the engine resolves locally.
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


# --- one training run -------------------------------------------------------------------------------------


class Stopped(Exception):
    """The parent asked for a stop: end after the current step."""


class Run:
    """One fine-tuning job as sent by the parent (see ``sage_magic.finetune.train._job`` for its fields)."""

    def __init__(self, job: dict[str, Any], emit: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
        self.job = job
        self.opt = job["options"]
        self.root = Path(job["root"])
        self.emit = emit
        self.stop = stop
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.checkpoints: list[int] = []
        #: Where this run writes: ``root`` itself when resuming, else a hidden staging sibling until the first
        #: checkpoint is complete, when it is renamed to ``root`` (see ``save_checkpoint``).
        self.out = self.root
        self.slowest_step = 0.0
        self.step_sleep = float(os.environ.get("SAGE_TEST_STEP_SLEEP") or 0)  # test hook, see the docstring

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
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.progress("load", f"Loading the tokenizer of {self.job['base_ref']}")
        tokenizer = AutoTokenizer.from_pretrained(self.job["base_path"])
        if not getattr(tokenizer, "chat_template", None):
            raise SageError(f"The base model {self.job['base_ref']!r} has no chat template, so a chat request "
                            "could never match what is trained. Use an instruct/chat model as the base.")
        examples = self.encode(tokenizer)
        train_rows, eval_rows = self.split(examples)
        resume_state = self.prepare_folder()
        self.progress("load", f"Loading {self.job['base_ref']} on {device}")
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        base = AutoModelForCausalLM.from_pretrained(self.job["base_path"], dtype=dtype).to(device)
        if resume_state is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, resume_state["folder"], is_trainable=True)
        else:
            model = lora_model(base, self.opt["rank"], self.opt["alpha"], self.opt["target_modules"],
                               self.job["base_ref"])
        params = trainable(model)
        optimizer = torch.optim.AdamW(params, lr=self.opt["lr"], weight_decay=0.0)
        start = 0
        if resume_state is not None:
            optimizer.load_state_dict(torch.load(Path(resume_state["folder"]) / OPTIMIZER_FILE,
                                                 map_location=device, weights_only=True))
            for group in optimizer.param_groups:
                group["lr"] = self.opt["lr"]
            start = resume_state["step"]
            self.losses = [tuple(x) for x in resume_state["losses"]]  # type: ignore[misc]
            self.eval_losses = [tuple(x) for x in resume_state["eval_losses"]]  # type: ignore[misc]
        per_epoch = math.ceil(len(train_rows) / self.opt["batch_size"])
        total = self.opt["max_steps"] or self.opt["epochs"] * per_epoch
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stopped = False
        began, last_event = time.monotonic(), 0.0
        model.train()
        try:
            for step in range(start + 1, total + 1):
                if self.stop.is_set():
                    raise Stopped
                step_began = time.monotonic()
                if self.step_sleep:
                    time.sleep(self.step_sleep)
                epoch, position = divmod(step - 1, per_epoch)
                order = list(range(len(train_rows)))
                random.Random(self.opt["seed"] * 1_000_003 + epoch).shuffle(order)
                chosen = [train_rows[i] for i in order[position * self.opt["batch_size"]:][:self.opt["batch_size"]]]
                loss = train_step(model, optimizer, params, batch(chosen, pad, device))
                self.losses.append((step, loss))
                eval_loss = None
                if step % self.opt["save_every"] == 0 or step == total:
                    eval_loss = self.evaluate(model, eval_rows, pad, device, step)
                    self.save_checkpoint(model, optimizer, step, total)
                now = time.monotonic()
                self.slowest_step = max(self.slowest_step, now - step_began)  # with eval and save: the stop grace
                if now - last_event >= EVENT_INTERVAL or step == total or eval_loss is not None:
                    last_event = now
                    rate = (step - start) / max(now - began, 1e-9)
                    eta = (total - step) / rate if rate > 0 else None
                    self.progress(
                        "train", f"step {step}/{total}, epoch {epoch + 1}, loss {loss:.4f}"
                        + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
                        + (f", ETA {eta:.0f} s" if eta is not None else ""),
                        step / total, step=step, total_steps=total, epoch=epoch + 1, loss=loss, eval_loss=eval_loss,
                        eta_s=eta, steps_per_s=rate, step_s=self.slowest_step)
        except Stopped:
            stopped = True
        model.eval()
        if not stopped:
            self.publish_final(tokenizer, total)
        elif self.out == self.root:  # with no checkpoint yet, the staging folder goes: NAME/ is as it was
            self.write_meta("stopped", self.losses[-1][0] if self.losses else start)
        return {"stopped": stopped, "steps": self.losses[-1][0] if self.losses else start, "total_steps": total,
                "losses": self.losses, "eval_losses": self.eval_losses, "checkpoints": self.checkpoints,
                "device": device, "seconds": time.monotonic() - began,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "train_rows": len(train_rows), "eval_rows": len(eval_rows)}

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

    def prepare_folder(self) -> dict[str, Any] | None:
        """Make the output folder ready: a fresh staging folder for a new run or an overwrite (a crashed run's
        staging siblings are swept first), or NAME/ itself with the checkpoint to resume."""
        for leftover in leftovers(self.root):
            if leftover != self.out:
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
        return state

    def evaluate(self, model: Any, rows: list[Example], pad: int, device: str, step: int) -> float | None:
        if not rows:
            return None
        import torch

        size = self.opt["batch_size"]
        total, weight = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), size):
                chunk = rows[i:i + size]
                tokens = sum(sum(1 for x in lab if x != -100) for _, lab in chunk)
                ids, mask, labels = batch(chunk, pad, device)
                total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()) * tokens
                weight += tokens
        loss = total / max(weight, 1)
        self.eval_losses.append((step, loss))
        return loss

    def save_checkpoint(self, model: Any, optimizer: Any, step: int, total: int) -> None:
        import torch

        target = self.out / "checkpoints" / f"checkpoint-{step}"
        with staging(target) as tmp:
            save_adapter(model, tmp)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            state = {"step": step, "total_steps": total, "losses": self.losses, "eval_losses": self.eval_losses,
                     "options": self.opt, "saved_at": utc_now()}
            write_json_atomic(tmp / STATE_FILE, state, mode=0o644)
            publish(tmp, target)
        if step not in self.checkpoints:
            self.checkpoints.append(step)
        self.write_meta("training", step)
        if self.out != self.root:  # the first complete checkpoint: the new fine-tune replaces the old one now
            publish(self.out, self.root)
            self.out = self.root
        self.progress("checkpoint", f"checkpoint-{step} saved", step / total, step=step)

    def publish_final(self, tokenizer: Any, total: int) -> None:
        """lora_weights/ = the last checkpoint's adapter plus the tokenizer; then the log and the final meta."""
        newest = self.out / "checkpoints" / f"checkpoint-{max(self.checkpoints)}"
        target = self.root / "lora_weights"
        with staging(target) as tmp:
            for item in newest.iterdir():
                if item.name not in (OPTIMIZER_FILE, STATE_FILE):
                    shutil.copy2(item, tmp / item.name)
            tokenizer.save_pretrained(tmp)
            publish(tmp, target)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        lines = [f"{utc_now()} LoRA r={self.opt['rank']} alpha={self.opt['alpha']} on {self.job['base_ref']}, "
                 f"lr={self.opt['lr']}, batch={self.opt['batch_size']}"]
        lines += [f"step {s} loss {loss:.4f}" for s, loss in self.losses]
        lines += [f"step {s} eval_loss {loss:.4f}" for s, loss in self.eval_losses]
        (logs / "train.log").write_text("\n".join(lines) + "\n")
        self.write_meta("done", total)

    def write_meta(self, status: str, steps: int) -> None:
        meta = {"model": self.job["base_ref"], "task": "sft", "status": status, "updated_at": utc_now(),
                "lora_r": self.opt["rank"], "lora_alpha": self.opt["alpha"],
                "target_modules": self.opt["target_modules"] or "all-linear", "learning_rate": self.opt["lr"],
                "batch_size": self.opt["batch_size"], "max_length": self.opt["max_length"],
                "seed": self.opt["seed"], "steps": steps, "rows": len(self.job["examples"])}
        write_json_atomic(self.out / META_FILE, meta, mode=0o644)


# --- the process ------------------------------------------------------------------------------------------


def _watch_stdin(stop: threading.Event) -> None:
    """``stop`` lines ask for a clean stop; EOF means the parent died: exit now, the files stay consistent."""
    for line in sys.stdin:
        if line.strip() == "stop":
            stop.set()
    os._exit(3)


def main() -> int:
    events: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to the log, never into the event stream
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            events.write(json.dumps(event) + "\n")

    job = json.loads(sys.stdin.readline())
    stop = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with torch_session(job["options"]["seed"]):
            result = Run(job, emit, stop).run()
    except SageError as error:
        emit({"event": "error", "message": str(error)})
        return 2
    emit({"event": "done", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
