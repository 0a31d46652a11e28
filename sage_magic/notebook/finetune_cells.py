"""The notebook face of training: ``%sage finetune train|watch|stop``.

Thin over the engine: ``train.train`` (which runs training in its own child process, so torch never enters
the kernel). What lives here is notebook glue.

Threads: training always runs in a background thread of the kernel (it only reads the child's JSON events),
with a ``cancel`` Event. By default the cell waits for it and draws the progress bar and the loss curve from
the cell's own thread (so every display update carries that cell's parent message, which every frontend and
nbclient route correctly); a kernel interrupt, wherever it lands (while the cell waits or draws), sets the
cancel and waits for the clean stop (a second one kills the child). The cell's thread only ever waits in
slices: an untimed wait would hold back an interrupt raised with ``_thread.interrupt_main`` (how ipykernel
interrupts on Windows) until the run ended. With ``--background`` the cell returns as soon as the child has
started (errors in the data, the name, the options or the base are still raised in the cell), other cells run
meanwhile, ``%sage finetune watch NAME`` draws the progress in the cell that asks (interrupting it only
detaches: people interrupt to get the kernel back, not to lose the run), and ``%sage finetune stop [--now]
[NAME]`` ends it cleanly from any cell (``--now``: kills it). Either way the last complete checkpoint stays
usable. ``watch`` and ``stop`` without a name and with nothing running report how the last run ended, so a
background failure is never silent.

When a run ends, the session forgets its cached leases on that fine-tune, so the next ``%%sage
--finetune-model NAME`` asks the manager again, which reloads a changed adapter in place.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.errors import SageError
from .parsing import identifier, notebook_variable

if TYPE_CHECKING:
    from ..core.progress import Progress
    from ..finetune.train import TrainOptions, TrainResult
    from .context import CellContext
    from .display import LiveOutput
    from .parsing import MagicParser

#: How long a ``--background`` cell waits for the child's first event (validation happens before it).
START_TIMEOUT = 120.0


@dataclass
class TrainRun:
    """One training run of this kernel: its thread, the way to stop it, its events and its outcome."""

    name: str
    cancel: threading.Event = field(default_factory=threading.Event)
    kill: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: list["Progress"] = field(default_factory=list)
    result: "TrainResult | None" = None
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)

    def progress(self, event: "Progress") -> None:
        self.events.append(event)  # list.append is atomic: the watching thread reads a consistent prefix

    def wait(self) -> None:
        """Until the run ends, in slices, so that an interrupt reaches the waiting thread at once."""
        while not self.done.wait(0.1):
            pass


def train_parser() -> "MagicParser":
    """``sage finetune train``'s options (one definition: options.add_train_options), --data a variable."""
    from ..faces.options import add_train_options
    from .parsing import MagicParser

    parser = MagicParser(prog="%sage finetune train")
    parser.add_argument("name")
    parser.add_argument("--data", required=True, type=identifier, metavar="VAR",
                        help="a pandas DataFrame in this notebook with the examples")
    parser.add_argument("--background", action="store_true",
                        help="return at once and train while other cells run (`%%sage finetune watch|stop NAME`)")
    add_train_options(parser)
    return parser


def name_parser(prog: str) -> "MagicParser":
    """``watch [NAME]`` and ``stop [--now] [NAME]``: one parser, ``--now`` only for a stop."""
    from .parsing import MagicParser

    parser = MagicParser(prog=prog)
    parser.add_argument("name", nargs="?", help="the fine-tune being trained (default: every run of this kernel)")
    if prog.endswith(" stop"):
        parser.add_argument("--now", action="store_true",
                            help="kill the training at once instead of after its current step (the last "
                                 "complete checkpoint stays usable)")
    return parser


# --- training -------------------------------------------------------------------------------------------------


def start_training(magics: "CellContext", args: argparse.Namespace) -> TrainRun:
    """Check the DataFrame in the cell's thread, then train in a background thread."""
    from ..core.tables import from_dataframe
    from ..faces.options import train_options
    from ..feedback.data import is_feedback, training_rows
    from ..finetune.train import rows_from_table

    frame = notebook_variable(magics.shell.user_ns, args.data, "Pass the name of a pandas DataFrame with --data VAR.")
    table = from_dataframe(frame, f"DataFrame {args.data!r}")
    if is_feedback(table):  # `%sage feedback -o VAR`: corrections and good answers, in their situation
        rows, left_out = training_rows(table)
        if left_out:
            print(f"{left_out} answer(s) rated bad without a correction left out: there is nothing to learn from "
                  "them until they are corrected.")
    else:
        rows = rows_from_table(table, args.prompt_col, args.response_col, args.messages_col)
    options = train_options(args)
    runs = magics.training
    current = runs.get(args.name)
    if current is not None and not current.done.is_set():
        raise SageError(f"Fine-tune {args.name!r} is already training in this kernel. `%sage finetune watch "
                        f"{args.name}` shows it, `%sage finetune stop {args.name}` ends it.")
    run = TrainRun(args.name)
    runs[args.name] = run
    session = magics.session
    thread = threading.Thread(target=_train, args=(session, run, args.base, rows, options), daemon=True,
                              name=f"sage-train-{args.name}")
    thread.start()
    return run


def _train(session: Any, run: TrainRun, base: str | None, rows: list, options: "TrainOptions") -> None:
    from ..finetune.train import train

    try:
        run.result = train(session.settings, run.name, base, rows, options, run.progress, run.cancel, run.kill)
    except BaseException as error:  # handed to the cell that watches; a thread has nobody else to tell
        run.error = error
    finally:
        if run.result is not None:
            session.forget_finetune(run.name)  # the next %%sage asks the manager: it reloads the new adapter
        run.done.set()


def wait_started(run: TrainRun) -> None:
    """Until the child reports (validation passed) or the run ends; a validation error is raised here."""
    deadline = time.monotonic() + START_TIMEOUT
    while not run.events and not run.done.wait(0.1) and time.monotonic() < deadline:
        pass
    if run.done.is_set() and run.error is not None:
        raise run.error


def watch(magics: "CellContext", run: TrainRun, detach: bool = False) -> "TrainResult | None":
    """Draw the run's progress in this cell until it ends.

    The first interrupt, wherever it lands (waiting or drawing), asks the run to stop cleanly and keeps drawing
    until it has; a second one kills it. With ``detach`` an interrupt only ends the watching: the training goes
    on."""
    from .display import LiveOutput

    live = LiveOutput(magics.shell, max(magics.update_interval, 0.25))
    interrupted = False
    while True:
        try:
            _draw_until_done(run, live)
            break
        except KeyboardInterrupt:
            if detach:
                print(f"Stopped watching {run.name}; it goes on training in the background. `%sage finetune "
                      f"watch {run.name}` shows it again, `%sage finetune stop {run.name}` ends it.")
                return None
            if interrupted:
                run.kill.set()
                raise
            interrupted = True
            run.cancel.set()
    if run.error is not None:
        raise run.error
    if interrupted:
        raise KeyboardInterrupt
    return run.result


def _draw_until_done(run: TrainRun, live: "LiveOutput") -> None:
    shown = -1
    while True:
        finished = run.done.wait(0.1)
        if finished or (len(run.events) != shown and live.due()):
            shown = len(run.events)
            live.show(training_bundle(run, time.monotonic() - run.started))
        if finished:
            return


def training_bundle(run: TrainRun, elapsed: float) -> dict[str, Any]:
    """Progress bar (step, epoch, ETA) and the loss curve (train and eval) from the run's events so far."""
    import html

    from .charts import line_chart

    events = list(run.events)
    steps = [e.data for e in events if e.phase == "train" and e.data]
    losses = {int(d["step"]): float(d["loss"]) for d in steps}
    eval_losses = {int(d["step"]): float(d["eval_loss"]) for d in steps if d.get("eval_loss") is not None}
    if run.result is not None:  # the whole history (a resumed run starts with the earlier steps)
        losses.update({int(s): float(v) for s, v in run.result.losses})
        eval_losses.update({int(s): float(v) for s, v in run.result.eval_losses})
    last = steps[-1] if steps else {}
    total = last.get("total_steps") or (run.result.total_steps if run.result else None)
    fraction: float | None = None
    if run.result is not None or run.error is not None:
        line = outcome(run, timing=True)
        if run.result is not None:
            fraction = run.result.steps / run.result.total_steps
    elif last:
        eta = last.get("eta_s")
        line = (f"{run.name}: step {last['step']}/{total}, epoch {last.get('epoch')}, loss {last['loss']:.4f}"
                + (f", ETA {eta:.0f} s" if eta is not None else "")
                + (" (stopping after this step)" if run.cancel.is_set() else ""))
        fraction = last["step"] / total if total else None
    else:
        line = events[-1].message if events else f"{run.name}: starting the training process"
    line += f" ({elapsed:.0f} s)"
    bar = ("<progress style='width: 16em'></progress>" if fraction is None else
           f"<progress style='width: 16em' value='{fraction:.3f}' max='1'></progress>")
    chart = ""
    if losses:
        chart = line_chart({"train loss": sorted(losses.items()), "eval loss": sorted(eval_losses.items())},
                           x_max=total, title=f"{run.name} loss")
    text = line + (f"\nlast loss {losses[max(losses)]:.4f}" if losses else "")
    return {"text/plain": text, "text/html": f"<div>{bar} {html.escape(line)}</div>{chart}"}


def train_cell(magics: "CellContext", args: argparse.Namespace) -> None:
    run = start_training(magics, args)
    if args.background:
        wait_started(run)
        print(f"Training {args.name} in the background: `%sage finetune watch {args.name}` shows its progress, "
              f"`%sage finetune stop {args.name}` ends it (the last complete checkpoint stays usable).")
        return
    watch(magics, run)


def _runs(magics: "CellContext", name: str | None) -> list[TrainRun]:
    runs = magics.training
    if name is not None and name not in runs:
        raise SageError(f"This kernel has not trained {name!r}. Runs here: {', '.join(runs) or 'none'}.")
    return [runs[name]] if name else list(runs.values())


def outcome(run: TrainRun, timing: bool = False) -> str:
    """How a finished run ended, in one line (with its error: a background run has nobody else to tell);
    ``timing`` adds how long it took and where, as the progress display shows it."""
    from ..faces.text import adapter_note

    result = run.result
    if result is not None:
        state = "stopped" if result.stopped else "done"
        took = f" in {result.seconds:.0f} s on {result.device}" if timing else ""
        return f"{run.name}: {state} at step {result.steps}/{result.total_steps}{took}; adapter: {adapter_note(result)}"
    return f"{run.name}: failed: {run.error}"


def _nothing_running(magics: "CellContext") -> None:
    """Say so, and how the kernel's last run ended: its failure may have happened while nobody watched."""
    runs = sorted(magics.training.values(), key=lambda run: run.started)
    last = f" The last run: {outcome(runs[-1])}" if runs else ""
    print(f"No training is running in this kernel.{last}")


def watch_cell(magics: "CellContext", args: argparse.Namespace) -> None:
    runs = [r for r in _runs(magics, args.name) if args.name or not r.done.is_set()]
    if not runs:
        _nothing_running(magics)
    for run in runs:
        watch(magics, run, detach=True)


def stop_cell(magics: "CellContext", args: argparse.Namespace) -> None:
    running = [r for r in _runs(magics, args.name) if not r.done.is_set()]
    for run in running:
        (run.kill if args.now else run.cancel).set()
    for run in running:
        run.wait()
        print(outcome(run))
    if not running:
        _nothing_running(magics)
