"""Fine-tune loop benchmark: training speed and memory, adapter hand-over, and concurrent evaluation.

Figures depend on the machine and its load, so they are printed with their goals for a person (or a CI log)
to read; a missed goal does not fail the run. An error does (exit 1), and so does a process of ours left
running at the end (a training child or a vLLM server).

Everything happens in one temp dir (a copy of --home, or a demo built there by `sage finetune demo` in a
child process, so that this process never imports torch and its RSS means something), with one vLLM server.

    python benchmarks/finetune_bench.py --short             # CI size
    python benchmarks/finetune_bench.py --home /tmp/demo     # full run on a COPY of an existing demo home
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from sage_magic.core.config import Settings
from sage_magic.core.progress import Progress
from sage_magic.evals.evaluate import Item, evaluate
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_ANSWERS_2, DEMO_BASE, DEMO_PROMPT, DEMO_PROMPT_2
from sage_magic.finetune.train import TrainOptions, train
from sage_magic.serving.manager import Manager

VLLM_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "64M")
MIB = 1 << 20
FLOOR = Path(__file__).with_name("finetune_floor.py")
#: The throughput row: one word repeated, so every row of a batch has the same length and no padding.
SPEED_ROW = ("Say the word model many times.", " ".join(["model"] * 60))
SPEED_BATCH = 4


def rss() -> int:
    return psutil.Process().memory_info().rss


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(name: str, value: str, goal: str, met: bool | None) -> None:
    verdict = "" if met is None else ("  [met]" if met else "  [MISSED]")
    print(f"{name:<44} {value:<28} goal {goal}{verdict}", flush=True)


def prepare_home(source: str | None, workdir: Path) -> Path:
    home = workdir / "home"
    if source:
        shutil.copytree(source, home, ignore=shutil.ignore_patterns("merged_model", ".*lock"))
    else:
        subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "--home", str(home), "finetune", "demo"],
                       check=True, stdout=subprocess.DEVNULL)
    return home


class PeakRss:
    """This process's RSS sampled every 50 ms while a block runs (what a kernel pays during training)."""

    def __init__(self) -> None:
        self.before = rss()
        self.peak = self.before
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def bench_train(settings: Settings, steps: int) -> None:
    rows = [(DEMO_PROMPT, "I am a benchmark parrot."), (DEMO_PROMPT_2, "I count steps per second.")]
    options = TrainOptions(max_steps=steps, lr=2e-3, batch_size=2, save_every=max(1, steps // 2))
    started = time.monotonic()
    with PeakRss() as memory:
        result = train(settings, "bench_parrot", DEMO_BASE, rows, options)
    wall = time.monotonic() - started
    report("train steps/s (tiny demo base, batch 2)", f"{result.steps / result.seconds:.1f} ({result.device})",
           "report", None)
    report("train wall time incl. child start + load", f"{wall:.1f} s for {result.steps} steps", "report", None)
    report("training child peak RSS", f"{result.peak_rss / MIB:.0f} MiB", "report", None)
    report(f"final train loss at step {result.steps} (fixed task)", f"{result.losses[-1][1]:.4f}", "report", None)
    delta = (memory.peak - memory.before) / MIB
    report("calling process RSS growth during training", f"{delta:.1f} MiB", "<= 50 MiB", delta <= 50)


def torch_child(*args: str) -> dict:
    """Run finetune_floor.py (torch stays out of this process) and return its JSON line."""
    out = subprocess.run([sys.executable, str(FLOOR), *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def engine_speed(settings: Settings, name: str, base: str, steps: int, row: tuple[str, str] = SPEED_ROW,
                 **options: Any) -> tuple[float, Any]:
    """Steps per second of the engine's median step, from the times of its progress events for consecutive
    steps from step 2 to the one before the last (start-up and the final save left out). Events come at most
    every 0.2 s, so on a tiny model an interval spans several steps: it counts as their mean."""
    seen: list[tuple[float, int]] = []

    def on_progress(event: Progress) -> None:
        if event.phase == "train" and event.data:
            seen.append((time.monotonic(), int(event.data["step"])))

    rows = [row] * (2 * SPEED_BATCH)
    result = train(settings, name, base, rows, TrainOptions(max_steps=steps, lr=1e-4, batch_size=SPEED_BATCH,
                                                            save_every=10 * steps, max_length=1024, **options),
                   on_progress)
    window = [(t, s) for t, s in seen if 2 <= s < result.total_steps]
    per_step = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(window, window[1:])]
    return 1 / statistics.median(per_step), result


def bench_speed(settings: Settings, short: bool) -> None:
    """Engine tokens/s against the bare PyTorch floor, on the demo base and a ~60M random-weight base."""
    big = settings.models_root / "bench-60m"
    made = torch_child("base", str(settings.models_root / DEMO_BASE), str(big))
    report("larger base (random weights, built here)", f"{made['params'] / 1e6:.0f}M parameters", "50-100M",
           50e6 <= made["params"] <= 100e6)
    sizes = (("demo base", DEMO_BASE, 40 if short else 80), ("60M base", str(big), 8 if short else 14))
    for label, base, steps in sizes:
        threads = max(1, min(4, (os.cpu_count() or 1) - int(os.getloadavg()[0])))  # the engine's rule
        floor_args = ("floor", str(settings.models_root / DEMO_BASE) if base == DEMO_BASE else base, "--prompt",
                      SPEED_ROW[0], "--response", SPEED_ROW[1], "--batch", str(SPEED_BATCH), "--steps",
                      str(max(4, steps // 2)), "--threads", str(threads))
        # The floor before and after the engine, the faster one kept: load from other work on the machine
        # can only make the ratio look worse, never better.
        before = torch_child(*floor_args)
        rate, result = engine_speed(settings, f"bench_speed_{label.split()[0]}", base, steps)
        floor = max(before, torch_child(*floor_args), key=lambda f: f["tokens_per_s"])
        tokens = rate * SPEED_BATCH * floor["seq"]
        ratio = tokens / floor["tokens_per_s"]
        report(f"train tokens/s, {label} (batch {SPEED_BATCH} x {floor['seq']})",
               f"{tokens:.0f} vs floor {floor['tokens_per_s']:.0f} ({ratio:.2f}x)",
               ">= 0.95x floor" if base != DEMO_BASE else "report", ratio >= 0.95 if base != DEMO_BASE else None)
        report(f"training child peak RSS, {label}", f"{result.peak_rss / MIB:.0f} MiB (floor "
               f"{floor['peak_rss'] / MIB:.0f} MiB, {threads} threads)", "report", None)


def bench_checkpointing(settings: Settings) -> None:
    """--gradient-checkpointing against none on the 60M base, with rows long enough for activations to count."""
    row = (SPEED_ROW[0], " ".join(["model"] * 250))
    figures = {flag: engine_speed(settings, f"bench_gc_{int(flag)}", str(settings.models_root / "bench-60m"), 5,
                                  row=row, gradient_checkpointing=flag) for flag in (False, True)}
    (plain_rate, plain), (gc_rate, gc) = figures[False], figures[True]
    report(f"--gradient-checkpointing child peak RSS (60M, batch {SPEED_BATCH} x ~270)",
           f"{gc.peak_rss / MIB:.0f} vs {plain.peak_rss / MIB:.0f} MiB ({gc.peak_rss / plain.peak_rss:.2f}x)",
           "lower", gc.peak_rss < plain.peak_rss)
    report("--gradient-checkpointing step time", f"{1 / gc_rate:.2f} vs {1 / plain_rate:.2f} s "
           f"({plain_rate / gc_rate:.2f}x slower)", "report", None)


def bench_resume(settings: Settings) -> None:
    """A run stopped at step ~10 and resumed to 20 against the same run uninterrupted: the losses after the
    resume (same rows, seed and schedule) should be the ones the uninterrupted run had."""
    rows = [(DEMO_PROMPT, "I am a benchmark parrot."), (DEMO_PROMPT_2, "I count steps per second.")]
    options = TrainOptions(max_steps=20, lr=2e-3, batch_size=1, save_every=50, lr_scheduler="cosine",
                           warmup_ratio=0.1)
    whole = dict(train(settings, "bench_whole", DEMO_BASE, rows, options).losses)
    cancel = threading.Event()

    def stop_at_ten(event: Progress) -> None:
        if event.phase == "train" and event.data and event.data["step"] >= 10:
            cancel.set()

    first = train(settings, "bench_resumed", DEMO_BASE, rows, dataclasses.replace(options, save_every=5),
                  stop_at_ten, cancel)
    resumed = train(settings, "bench_resumed", None, rows, dataclasses.replace(options, resume=True))
    after = [(s, loss) for s, loss in resumed.losses if s > first.steps]
    gap = max(abs(loss - whole[s]) for s, loss in after)
    report(f"resume: loss after resuming at step {first.steps} vs uninterrupted", f"max |diff| {gap:.2e} over "
           f"{len(after)} steps", "< 1e-3 (the curve goes on)", gap < 1e-3)


def bench_stop(settings: Settings) -> None:
    """From the cancel event to train() returning, with the child gone and the checkpoint kept."""
    cancel = threading.Event()
    asked: list[float] = []

    def stop_at_checkpoint(event: Progress) -> None:
        if event.phase == "checkpoint" and not asked:
            asked.append(time.monotonic())
            cancel.set()

    result = train(settings, "bench_stop", DEMO_BASE, [(DEMO_PROMPT, "Stop me.")],
                   TrainOptions(max_steps=100_000, lr=2e-3, batch_size=1, save_every=5), stop_at_checkpoint, cancel)
    seconds = time.monotonic() - asked[0]
    report("stop: cancel -> train() returned", f"{seconds * 1000:.0f} ms (at step {result.steps})", "<= 1 s",
           seconds <= 1.0)


class WorkerPeaks:
    """Peak RSS of every training process (the worker, or each one torchrun starts), polled every 50 ms from
    outside: a process's own ru_maxrss reaches the caller from rank 0 only. torchrun itself is left out."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            for proc in psutil.Process().children(recursive=True):
                try:
                    line = " ".join(proc.cmdline())
                    if "sage_magic.finetune.worker" in line and "torch.distributed.run" not in line:
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> "WorkerPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def bench_processes(settings: Settings, steps: int) -> None:
    """--processes 2 (torchrun, gloo) against one process, same rows and steps: the peak RSS of each training
    process (each holds a whole model: data parallel), and the rows per second of the whole run."""
    big = settings.models_root / "bench-60m"
    base, label = (str(big), "60M base") if big.is_dir() else (DEMO_BASE, "demo base")
    rows = [SPEED_ROW] * (4 * SPEED_BATCH)
    figures = {}
    for processes in (1, 2):
        with WorkerPeaks() as peaks:
            result = train(settings, f"bench_procs_{processes}", base, rows,
                           TrainOptions(max_steps=steps, lr=1e-4, batch_size=SPEED_BATCH, save_every=10 * steps,
                                        processes=processes))
        figures[processes] = (sorted(peaks.peaks.values()), processes * SPEED_BATCH * result.steps / result.seconds)
    (floor,), rows_1 = figures[1]
    several, rows_2 = figures[2]
    assert len(several) == 2, f"expected 2 training processes, saw {len(several)}"
    worst = max(several)
    report(f"--processes 2 peak RSS per process ({label})",
           f"{' / '.join(f'{p / MIB:.0f}' for p in several)} vs 1 process {floor / MIB:.0f} MiB "
           f"({worst / floor:.2f}x)", "<= 1.10x (each holds one model)", worst <= 1.10 * floor)
    report(f"--processes 2 rows/s ({label}, batch {SPEED_BATCH} each)",
           f"{rows_2:.1f} vs 1 process {rows_1:.1f} ({rows_2 / rows_1:.2f}x, {os.cpu_count()} CPUs)", "report", None)


def bench_handover(manager: Manager) -> None:
    manager.serve_finetune("demo_expert")  # the base server, running (its start is not what is measured)
    started = time.monotonic()
    manager.serve_finetune("bench_parrot")
    seconds = time.monotonic() - started
    report("new adapter served by the running base server", f"{seconds * 1000:.0f} ms", "<= 1 s", seconds <= 1.0)


def eval_rows(prompts: int) -> list[Item]:
    """The demo questions, then numbered variants: distinct prompts, so no request is a pure prefix-cache hit."""
    questions = [(DEMO_PROMPT, DEMO_ANSWERS["demo_expert"]), (DEMO_PROMPT_2, DEMO_ANSWERS_2["demo_expert"])]
    rows = []
    for i in range(prompts):
        question, answer = questions[i % len(questions)]
        rows.append(Item(question if i < len(questions) else f"{question} ({i})", answer))
    return rows


def eval_rate(manager: Manager, rows: list[Item], models: list[str], concurrency: int) -> float:
    """Requests/s of one evaluate() run (24-token answers); a failed request is an error, not a figure."""
    result = evaluate(rows, models, manager=manager, concurrency=concurrency, max_tokens=24)
    failed = sum(a.error is not None for r in result.rows for a in r.answers.values())
    if failed:
        raise RuntimeError(f"{failed} requests failed evaluating {models} at concurrency {concurrency}")
    return len(rows) * len(models) / result.seconds


def bench_eval(manager: Manager, prompts: int) -> None:
    rows = eval_rows(prompts)
    models = ["demo_expert", "demo_poet", "bench_parrot"]
    evaluate(rows[:2], models, manager=manager, concurrency=8)  # warm-up: adapters loaded, caches filled
    rates = {}
    for concurrency in (1, 8):
        rates[concurrency] = eval_rate(manager, rows, models, concurrency)
        report(f"eval requests/s, concurrency {concurrency}", f"{rates[concurrency]:.1f} "
               f"({len(rows) * len(models)} requests)", "report", None)
    ratio = rates[8] / rates[1]
    report("eval concurrent / sequential", f"{ratio:.2f}x", ">= 3x", ratio >= 3)


def leftovers(runtime: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "sage_magic.finetune.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SAGE_RUNTIME_DIR") == str(runtime):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI size: fewer steps and prompts")
    parser.add_argument("--home", help="a demo SAGE home to copy (default: build the demo in the temp dir)")
    parser.add_argument("--only", choices=("train", "serve"), help="only the training figures, or only serving")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="sage-finetune-bench-"))
    runtime = workdir / "run"
    failed = False
    manager = None
    try:
        home = prepare_home(args.home, workdir)
        settings = Settings.from_env(environ={}, home=home, runtime_dir=runtime, vllm_args=VLLM_ARGS,
                                     port=free_port(), ready_timeout=600.0, stop_grace=6.0)
        print(f"finetune_bench ({'short' if args.short else 'full'}) on {os.cpu_count()} CPUs, in {workdir}")
        if args.only != "serve":
            bench_train(settings, 20 if args.short else 60)
            bench_speed(settings, args.short)
            bench_checkpointing(settings)
            bench_resume(settings)
            bench_stop(settings)
            bench_processes(settings, 6 if args.short else 12)
        if args.only != "train":
            if args.only == "serve":
                bench_train(settings, 4)  # the adapter handed over
            manager = Manager(settings)
            bench_handover(manager)
            bench_eval(manager, 8 if args.short else 24)
    except Exception:
        traceback.print_exc()
        failed = True
    finally:
        if manager is not None:
            manager.close(wait=True)
    return finish(runtime, workdir, failed, patience=0.5)


def finish(runtime: Path, workdir: Path, failed: bool, patience: float) -> int:
    """The exit status: 1 if the run failed or a process of ours is still there after ``patience`` seconds
    (the supervisors stop what nobody uses any more); the temp dir is removed only after a clean run."""
    deadline = time.monotonic() + patience
    while leftovers(runtime) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = leftovers(runtime)
    if left:
        print(f"LEFT RUNNING: {[p.pid for p in left]}", file=sys.stderr)
        failed = True
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
