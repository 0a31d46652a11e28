"""Fine-tuning a LoRA adapter from a table of examples, without torch in the calling process.

``train`` checks everything it can without a model (the name, the base, the rows, the options) and raises one
:class:`SageError` before anything slow starts; then it runs ``python -m sage_magic.finetune.worker`` (see
there for the file layout and the stop protocol; with ``--processes``/``--nnodes``, torchrun starts it, see
``launch``), turns its JSON-line events into :class:`Progress` events
(``data`` holds step, epoch, loss, eval loss, ETA) and returns a :class:`TrainResult`. The engine in the child
is TRL's SFTTrainer (``engine``); ``--resume`` goes through the Trainer's own resume from the newest checkpoint.
The child tokenizes every row before the first step, so a row longer than ``max_length`` is also refused
before training.

A set ``cancel`` event or a KeyboardInterrupt (kernel interrupt) asks the child to stop after its current
step, with a checkpoint of that step once the run has one in place (``--resume`` continues exactly there),
leaving the last complete checkpoint usable and nothing half-written. Cancel
returns a result with ``stopped=True``; an interrupt is re-raised once the child is gone. A step of a 1B+
model on CPU can take minutes, so the stop is waited for as long as the slowest step the child reported
takes, a few times over (:func:`stop_grace`); only a set ``kill`` event (``stop --now``) or a second
interrupt ends the child at once (torchrun's processes too). The caller's death (stdin-EOF death pipe plus
PR_SET_PDEATHSIG, as for the server supervisor) stops the child the same way, by itself: after its current
step, saved, within the same grace.

Output: ``$SAGE_HOME/finetune_output/NAME/`` in the SAGE layout, so ``sage finetune list`` and every serving
path pick it up (``lora_weights/`` once finished, else the newest checkpoint).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Union

from ..core.config import Settings
from ..core.errors import NotFound, SageError
from ..core.files import LockBusy, exclusive
from ..core.processes import death_signal, kill_tree
from ..core.progress import Progress, ProgressCallback, silent
from ..core.staging import staging, sweep_leftovers
from ..core.tables import Table, is_missing
from ..tracking.report import check_installed, trackers, training_env
from . import launch
from .catalog import META_FILE, checkpoints_of, get_finetune, read_json, resolve_base

Messages = list[dict[str, str]]
#: A training row: a (prompt, response) pair or a chat conversation ending with the assistant's answer.
Row = Union[tuple[str, str], Sequence[Mapping[str, str]]]
ROLES = ("system", "user", "assistant")
RESERVED_NAMES = ("base",)  # `sage eval --models base` means the base of the fine-tunes named
#: The least time a stopping child is given before it is killed (it checks for a stop after every step).
STOP_GRACE = 15.0
#: A stopping child is given this many times its slowest reported step (with eval and save), if that is more.
STOP_GRACE_STEPS = 4
#: What a checkpoint needs for the Trainer's own resume (weights, optimizer, schedule, step and log).
RESUME_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


LR_SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class TrainOptions:
    """The knobs of one run. ``max_steps`` wins over ``epochs``; ``target_modules=None`` means every linear
    layer; a checkpoint is saved every ``save_every`` steps and at the end. A step is ``grad_accum`` batches
    of ``batch_size`` rows. ``precision="auto"`` is bf16 mixed precision where the GPU has it and fp32 on a
    CPU; the adapter's weights are fp32 in every mode. The schedule is constant by default (what the demo
    recipe and a few-row fine-tune want); ``warmup_ratio`` is the share of the steps spent warming up.
    ``deepspeed`` is a config file passed to the Trainer; ``fsdp`` needs several processes."""

    epochs: int = 3
    max_steps: int | None = None
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] | None = None
    batch_size: int = 4
    max_length: int = 1024
    seed: int = 1234
    eval_split: float = 0.0
    save_every: int = 50
    resume: bool = False
    overwrite: bool = False
    grad_accum: int = 1
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False
    load_in_4bit: bool = False
    deepspeed: str | None = None
    fsdp: bool = False
    report_to: tuple[str, ...] = ()  # trackers (sage_magic.tracking.report.TRACKERS); the run is named NAME
    processes: int = 1  # per machine (sage_magic.finetune.launch)
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of machine 0, when nnodes > 1


@dataclass
class TrainResult:
    """What a run did. ``adapter_dir`` is what serving uses now: lora_weights/ if finished, else the newest
    checkpoint (``stopped=True``), or None when it stopped before its first checkpoint (then NAME/ is as it was:
    absent, or the old fine-tune that ``--overwrite`` would have replaced)."""

    name: str
    root: Path
    adapter_dir: Path | None
    stopped: bool
    steps: int
    total_steps: int
    losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    checkpoints: list[int]
    device: str
    seconds: float
    peak_rss: int
    train_rows: int
    eval_rows: int
    options: TrainOptions = field(default_factory=TrainOptions)


def rows_from_table(table: Table, prompt_col: str = "prompt", response_col: str = "response",
                    messages_col: str | None = None) -> list[Row]:
    """Training rows from a table: a chat column of message lists, or a prompt and a response column."""
    if messages_col:
        values = table.column(messages_col, "--messages-col")
        return [_parse_messages(v) for v in values]
    return list(zip(table.column(prompt_col, "--prompt-col"), table.column(response_col, "--response-col")))


def _parse_messages(value: Any) -> Any:
    """A message list from a cell: a list already (jsonl, DataFrame), a JSON string (csv), or an array."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # normalize_rows explains what is wrong with it
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def normalize_rows(rows: Sequence[Row]) -> list[Messages]:
    """Every row as a message list, or one error naming the first bad row (numbered from 1)."""
    if not rows:
        raise SageError("There is nothing to train on: the data has no rows. Give at least one (prompt, response).")
    result = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, tuple) and len(row) == 2 and not isinstance(row[0], Mapping):
            prompt, response = row
            for what, value, option in (("prompt", prompt, "--prompt-col"), ("response", response, "--response-col")):
                if is_missing(value) or not isinstance(value, str):
                    raise SageError(f"Row {number} has an empty or non-text {what} ({value!r}). Fill or drop that "
                                    f"row, or check that {option} names the right column.")
            result.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
            continue
        result.append(_check_messages(number, row))
    return result


def _check_messages(number: int, row: Any) -> Messages:
    fix = ("Each conversation is a list of {\"role\": \"system\"|\"user\"|\"assistant\", \"content\": TEXT} "
           "ending with the assistant's answer.")
    if not isinstance(row, Sequence) or isinstance(row, str) or not row:
        raise SageError(f"Row {number} is not a conversation ({str(row)[:80]!r}). {fix}")
    messages = []
    for message in row:
        if not isinstance(message, Mapping) or message.get("role") not in ROLES \
                or is_missing(message.get("content")) or not isinstance(message.get("content"), str):
            raise SageError(f"Row {number} has a bad message ({str(message)[:80]!r}). {fix}")
        messages.append({"role": str(message["role"]), "content": str(message["content"])})
    if messages[-1]["role"] != "assistant":
        raise SageError(f"Row {number} does not end with an assistant message, so there is no answer to learn. {fix}")
    return messages


def check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name in RESERVED_NAMES:
        raise SageError(f"{name!r} cannot name a fine-tune: use letters, digits, '-' or '_' (not starting with '.', "
                        f"and not {', '.join(RESERVED_NAMES)}, which `sage eval` reserves).")


def _check_options(settings: Settings, options: TrainOptions) -> None:
    problems = []
    for label, value in (("--epochs", options.epochs), ("--rank", options.rank), ("--alpha", options.alpha),
                         ("--batch-size", options.batch_size), ("--max-length", options.max_length),
                         ("--save-every", options.save_every), ("--grad-accum", options.grad_accum)):
        if not isinstance(value, int) or value <= 0:
            problems.append(f"{label} must be a positive whole number, not {value!r}")
    if options.max_steps is not None and options.max_steps <= 0:
        problems.append(f"--max-steps must be positive, not {options.max_steps}")
    if not options.lr > 0:
        problems.append(f"--lr must be positive, not {options.lr}")
    if not 0 <= options.eval_split < 1:
        problems.append(f"--eval-split is a fraction from 0 to below 1, not {options.eval_split}")
    if options.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"--lr-scheduler is one of {', '.join(LR_SCHEDULERS)}, not {options.lr_scheduler!r}")
    if not 0 <= options.warmup_ratio < 1:
        problems.append(f"--warmup-ratio is a fraction from 0 to below 1, not {options.warmup_ratio}")
    if not options.weight_decay >= 0:
        problems.append(f"--weight-decay must be 0 or more, not {options.weight_decay}")
    if options.precision not in PRECISIONS:
        problems.append(f"--precision is one of {', '.join(PRECISIONS)}, not {options.precision!r}")
    if options.deepspeed is not None:
        problems += _deepspeed_problems(options.deepspeed)
    if options.resume and options.overwrite:
        problems.append("--resume continues a run and --overwrite replaces it: give one of them")
    problems.extend(launch.problems(options.processes, options.nnodes, options.node_rank, options.rdzv_endpoint))
    if problems:
        raise SageError("Cannot train with these options: " + "; ".join(problems) + ".")
    if options.rank > settings.max_lora_rank:
        raise SageError(f"--rank {options.rank} is above the serving limit of {settings.max_lora_rank}, so the "
                        f"adapter could only be served merged. Pick --rank {settings.max_lora_rank} or less, or "
                        f"raise the limit with SAGE_MAX_LORA_RANK={options.rank}.")


def _deepspeed_problems(path: str) -> list[str]:
    try:
        json.loads(Path(path).read_text())
    except OSError as error:
        return [f"--deepspeed {path} cannot be read ({error.strerror or error})"]
    except ValueError as error:
        return [f"--deepspeed {path} is not a JSON DeepSpeed config ({error})"]
    return []


def _job(settings: Settings, name: str, base: str | None, rows: Sequence[Row], options: TrainOptions) -> dict:
    """Validate everything that needs no model and build the child's job."""
    check_name(name)
    _check_options(settings, options)
    check_installed(settings.python, options.report_to)
    examples = normalize_rows(rows)
    root = settings.finetune_root / name
    resume_from, existing = None, []
    if root.exists() and not (options.overwrite or options.resume or options.node_rank > 0):
        raise SageError(f"A fine-tune named {name!r} already exists at {root}. Pick another name, add --resume to "
                        "continue its training from its newest checkpoint, or --overwrite to replace it.")
    if options.resume:
        if not (root / META_FILE).is_file():
            raise NotFound(f"There is no fine-tune {name!r} to resume under {settings.finetune_root}. "
                           "Leave out --resume to start a new one.")
        trained_on = read_json(root / META_FILE, f"The metadata of fine-tune {name!r}").get("model")
        if base is not None and base != trained_on:
            raise SageError(f"Fine-tune {name!r} was trained on {trained_on!r}, not {base!r}. Resume it on its own "
                            "base (leave out --base), or use --overwrite to start again on the new one.")
        base = trained_on
        existing = [n for n, _ in checkpoints_of(root)]
        resume_from = _resume_state(root, name)
    if not base:
        raise SageError("Say which model to fine-tune: --base NAME_OR_PATH (a folder under $SAGE_HOME/models, a "
                        "name mapped in $SAGE_HOME/models.json, or a path).")
    base_path = resolve_base(settings, base)
    eval_rows = max(1, round(len(examples) * options.eval_split)) if options.eval_split > 0 else 0
    if len(examples) - eval_rows < 1:
        raise SageError(f"--eval-split {options.eval_split} leaves no row to train on out of {len(examples)}. "
                        "Add rows or lower --eval-split.")
    opts = asdict(options)
    opts["target_modules"] = list(options.target_modules) if options.target_modules else None
    opts["deepspeed"] = str(Path(options.deepspeed).resolve()) if options.deepspeed else None
    return {"root": str(root), "name": name, "base_ref": base, "base_path": str(base_path), "examples": examples,
            "report_to": list(trackers(options.report_to)),  # the Trainer's integrations (SFTConfig.report_to)
            "row_numbers": list(range(1, len(examples) + 1)), "eval_rows": eval_rows, "options": opts,
            "resume": options.resume, "overwrite": options.overwrite, "resume_from": resume_from,
            "existing_checkpoints": existing}


def _resume_state(root: Path, name: str) -> dict:
    """The newest checkpoint with the Trainer's whole state (optimizer, scheduler, trainer state)."""
    for _, folder in reversed(checkpoints_of(root)):
        if all((folder / f).is_file() for f in RESUME_FILES):
            state = read_json(folder / "trainer_state.json", f"The training state of {folder.name}")
            if "global_step" in state:
                return {"folder": str(folder), "step": int(state["global_step"])}
    raise SageError(f"Fine-tune {name!r} has no checkpoint with a saved training state to resume from (it was "
                    "not trained by this version of sage_magic, or stopped before its first checkpoint). Use "
                    "--overwrite to train it again from the start.")


@contextmanager
def _training_lock(settings: Settings, name: str) -> Iterator[None]:
    settings.finetune_root.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(settings.finetune_root / f".{name}.train.lock", wait=False):
            yield
    except LockBusy:
        raise SageError(f"Fine-tune {name!r} is being trained by another process right now. Wait for it to "
                        "finish (or stop it), or train under another name.") from None


def train(settings: Settings, name: str, base: str | None, rows: Sequence[Row],
          options: TrainOptions = TrainOptions(), progress: ProgressCallback = silent,
          cancel: threading.Event | None = None, kill: threading.Event | None = None) -> TrainResult:
    """Train LoRA fine-tune NAME on ``base`` from ``rows`` in a child process; see the module docstring."""
    job = _job(settings, name, base, rows, options)
    root = Path(job["root"])
    # A helper machine of a several-machine run (--node-rank above 0) never writes NAME/: it takes no lock and
    # sweeps nothing, so that a SAGE_HOME shared with machine 0 (a cluster's network file system) stays its.
    helper = options.node_rank > 0
    settings.finetune_root.mkdir(parents=True, exist_ok=True)
    with nullcontext() if helper else _training_lock(settings, name):
        try:
            # The Trainer's checkpoints are written here, beside NAME/, and each is renamed into place whole; one
            # folder for all the child's processes (each saves its RNG state into the checkpoint).
            with staging(root) as scratch:
                result = _run_child(settings, {**job, "scratch": str(scratch)}, progress, cancel, kill)
        finally:  # a killed child leaves its hidden scratch and staging folders; the lock is still ours
            if not helper:
                sweep_leftovers(root)
    state = "stopped" if result["stopped"] else "done"
    progress(Progress("done", f"{name}: training {state} at step {result['steps']}/{result['total_steps']} in "
                              f"{result['seconds']:.1f} s", result["steps"] / result["total_steps"],
                      {"step": result["steps"], "total_steps": result["total_steps"], "stopped": result["stopped"]}))
    adapter_dir = get_finetune(settings, name).adapter_dir if result["checkpoints"] else None
    return TrainResult(name=name, root=root, adapter_dir=adapter_dir, stopped=result["stopped"],
                       steps=result["steps"], total_steps=result["total_steps"],
                       losses=[tuple(x) for x in result["losses"]],  # type: ignore[misc]
                       eval_losses=[tuple(x) for x in result["eval_losses"]],  # type: ignore[misc]
                       checkpoints=result["checkpoints"], device=result["device"], seconds=result["seconds"],
                       peak_rss=result["peak_rss"], train_rows=result["train_rows"], eval_rows=result["eval_rows"],
                       options=options)


class _Child:
    """The running worker: its events as they arrive, and the way to ask it to stop."""

    def __init__(self, settings: Settings, log: IO[bytes], job_file: str, options: dict[str, Any],
                 tracking: dict[str, str]) -> None:
        env = {**os.environ, **settings.extra_env, **tracking, launch.JOB_ENV: job_file, "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        command = launch.command(settings.python, options["processes"], options["nnodes"], options["node_rank"],
                                 options["rdzv_endpoint"])
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                     start_new_session=True, preexec_fn=death_signal())
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""
        self.eof = False
        self.stop_sent = False

    def events(self, timeout: float) -> list[dict]:
        """Events that arrived within ``timeout`` seconds ([] if none); sets ``eof`` when the child is done."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self.eof = True
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def stop(self) -> None:
        if not self.stop_sent and self.proc.poll() is None:
            self.stop_sent = True
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
            except OSError:
                pass

    def end(self, kill: bool = False) -> None:
        """Make sure the child is gone: close its death pipe and give it a moment (a child still training takes
        it as its caller's death: it finishes its step and saves it), then kill it; ``kill`` kills at once, the
        processes torchrun started included (they are not in its process group)."""
        if kill:
            kill_tree(self.proc.pid)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:  # BrokenPipeError from flushing what a dead child never read
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()


def stop_grace(slowest_step: float | None) -> float:
    """Seconds a stopping child is given: its current step may be as slow as the slowest it reported. Before
    its first step is done (loading a big model takes long) there is no measure, so it is not timed: it stops
    right before that step, or a second interrupt or ``stop --now`` kills it."""
    if slowest_step is None:
        return float("inf")
    return max(STOP_GRACE, STOP_GRACE_STEPS * slowest_step)


def _run_child(settings: Settings, job: dict, progress: ProgressCallback,
               cancel: threading.Event | None, kill: threading.Event | None) -> dict:
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("w", suffix=".json") as job_file:
        json.dump(job, job_file)  # a file, not stdin: under torchrun every process reads it (0600: mkstemp's)
        job_file.flush()
        child = _Child(settings, log, job_file.name, job["options"],
                       training_env(settings, job["report_to"], job["name"], job["base_ref"]))
        interrupted, killed, outcome = False, False, None
        stop_asked, slowest = None, None
        try:
            # Not waiting past the child's answer: what is left of it is its interpreter's exit (torch's teardown,
            # ~1.5 s), which closing its stdin cuts short (a child with nothing left to save exits at EOF).
            while not child.eof and outcome is None:
                try:
                    if cancel is not None and cancel.is_set() and not child.stop_sent:
                        child.stop()
                        stop_asked = time.monotonic()
                        progress(Progress("stop", f"{job['name']}: stopping after the current step"))
                    if (kill is not None and kill.is_set()) or \
                            (stop_asked is not None and time.monotonic() > stop_asked + stop_grace(slowest)):
                        killed = True
                        break
                    for event in child.events(0.1):
                        if event.get("event") == "progress":
                            step_s = (event.get("data") or {}).get("step_s")
                            slowest = slowest if step_s is None else max(slowest or 0.0, step_s)
                            progress(Progress(event["phase"], f"{job['name']}: {event['message']}",
                                              event.get("fraction"), event.get("data")))
                        else:
                            outcome = event
                except KeyboardInterrupt:
                    if interrupted:  # a second interrupt: no more waiting
                        killed = True
                        raise
                    interrupted = True
                    child.stop()
                    stop_asked = time.monotonic()
        finally:
            child.end(kill=killed)
        if outcome is not None and outcome.get("event") == "error":
            raise SageError(outcome["message"])
        if outcome is None or outcome.get("event") != "done":
            raise _failure(job["name"], child.proc.returncode, log, killed)
    if interrupted:
        raise KeyboardInterrupt
    return outcome["result"]


def _failure(name: str, status: int | None, log: IO[bytes], killed: bool) -> SageError:
    """One paragraph on a child that ended without a result: killed on request, or why it died (its log's
    last line: the exception of a traceback, or what the library printed last)."""
    if killed:
        return SageError(f"Training {name!r} was killed before it could stop cleanly. Its last complete "
                         "checkpoint, if it made one, is usable (`sage finetune list` shows it) and --resume "
                         "continues from it.")
    log.seek(0)
    lines = [line.strip() for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
    cause = f" Its last words: {lines[-1]}" if lines else " It wrote nothing."
    return SageError(f"Training {name!r} failed: the training process exited with status {status} before it "
                     f"finished.{cause} Check that the Python at SAGE_PYTHON (or this one) has torch, transformers "
                     "and peft installed and working, then train again; the last complete checkpoint, if any, "
                     "is usable.")
