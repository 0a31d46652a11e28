"""Load benchmark: K real kernels run `%%sage` cells at the same moment, on one fine-tune or spread over three.

What it answers: does one base server batch requests for several fine-tunes as well as for one? Each round
sends one cell per kernel at once (96-token answers, `min_tokens` so every answer is that long) and measures
the aggregate tokens/s (all tokens over the round's wall time, from the first cell sent to the last one
idle) and each stream's own tokens/s (the footer's figure). The floor is one kernel alone on the same server.
Then `evaluate()` (what `%sage eval` runs) over one fine-tune and over three, in requests/s.

Figures are printed with their goals; a missed goal still exits 0. An error, or a vLLM process of ours left
running, exits 1. To see the figures with one adapter per batch (vLLM's default), pass `--max-loras 1`
(it sets SAGE_MAX_LORAS for the kernels and this process).

    python benchmarks/load_bench.py --home /tmp/demo                 # 4 kernels, 3 rounds
    python benchmarks/load_bench.py --home /tmp/demo --max-loras 1   # the same with one slot per batch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from finetune_bench import VLLM_ARGS, eval_rate, eval_rows, finish, prepare_home, report

from sage_magic.core.config import Settings
from sage_magic.evals.evaluate import evaluate
from sage_magic.finetune.demo import DEMO_PROMPT
from sage_magic.serving.manager import Manager
from sage_magic.serving.registry import Registry

TOKENS = 96
#: The third fine-tune of the demo base: demo_poet's weights under another name, which vLLM serves as an
#: adapter of its own (its own id, its own slot): for throughput that is all that counts.
THIRD = "bench_third"
FINETUNES = ("demo_expert", "demo_poet", THIRD)


@dataclass
class Cell:
    """One `%%sage` cell's outcome in one kernel."""

    start: float
    end: float
    tokens: int
    tokens_per_s: float
    server: str | None
    error: str | None = None


class Kernel:
    """A real IPython kernel (jupyter_client) with sage_magic loaded, on the benchmark's home and registry."""

    def __init__(self, env: dict[str, str]) -> None:
        from jupyter_client import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        self.run("%load_ext sage_magic\nimport json")

    def run(self, code: str) -> str:
        """Run code; what it printed. A failure raises with the kernel's error."""
        printed: list[str] = []
        reply = self.client.execute_interactive(code, timeout=600, output_hook=lambda m: printed.append(
            m["content"].get("text", "") if m["msg_type"] == "stream" else
            f"ERROR {m['content'].get('ename')}: {m['content'].get('evalue')}" if m["msg_type"] == "error" else ""))
        if reply["content"]["status"] != "ok":
            raise RuntimeError("".join(printed) or f"{code!r} failed in the kernel")
        return "".join(printed)

    def ask(self, finetune: str) -> Cell:
        """One 96-token `%%sage` answer; its tokens and tokens/s as the answer's footer reports them."""
        start = time.monotonic()
        try:
            self.run(f"%%sage --finetune-model {finetune} --new-chat --max-tokens {TOKENS} "
                     f"--param min_tokens={TOKENS} -o _answer\n{DEMO_PROMPT}\n")
            end = time.monotonic()
            metrics = json.loads(self.run("print(json.dumps(_answer.metrics))"))
        except RuntimeError as error:
            return Cell(start, time.monotonic(), 0, 0.0, None, str(error).strip()[:200])
        return Cell(start, end, metrics["completion_tokens"] or 0, metrics["tokens_per_s"] or 0.0, metrics["server"])

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)


def round_of(kernels: list[Kernel], finetunes: list[str]) -> list[Cell]:
    """Every kernel sends its cell at once (one thread each); returns when the last answer is in."""
    with ThreadPoolExecutor(len(kernels)) as pool:
        return list(pool.map(lambda pair: pair[0].ask(pair[1]), zip(kernels, finetunes)))


def load_figures(label: str, kernels: list[Kernel], finetunes: list[str], rounds: int,
                 cells: list[Cell]) -> float:
    """Run ``rounds`` rounds, print the aggregate and per-stream tok/s; return the median aggregate."""
    aggregates, streams = [], []
    for _ in range(rounds):
        done = round_of(kernels, finetunes)
        cells += done
        ok = [c for c in done if c.error is None]
        wall = max(c.end for c in done) - min(c.start for c in done)
        aggregates.append(sum(c.tokens for c in ok) / wall)
        streams += [c.tokens_per_s for c in ok]
    aggregate = statistics.median(aggregates)
    spread = f"min {min(streams):.0f} / mean {statistics.mean(streams):.0f}" if streams else "none"
    report(f"{label}: aggregate tok/s (median of {rounds})", f"{aggregate:.0f}", "report", None)
    report(f"{label}: per-stream tok/s", spread, "report", None)
    return aggregate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="a demo SAGE home to copy (default: build the demo in the temp dir)")
    parser.add_argument("--kernels", type=int, default=4, help="kernels asking at once (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each load (default 3)")
    parser.add_argument("--prompts", type=int, default=48, help="eval prompts per fine-tune (default 48)")
    parser.add_argument("--max-loras", type=int, help="SAGE_MAX_LORAS for every server (default: sized)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="sage-load-bench-"))
    runtime = workdir / "run"
    kernels: list[Kernel] = []
    cells: list[Cell] = []
    manager = None
    failed = False
    try:
        home = prepare_home(args.home, workdir)
        shutil.copytree(home / "finetune_output" / "demo_poet", home / "finetune_output" / THIRD)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
        env.update(SAGE_HOME=str(home), SAGE_RUNTIME_DIR=str(runtime), SAGE_VLLM_ARGS=" ".join(VLLM_ARGS),
                   HF_HUB_OFFLINE="1")
        if args.max_loras:
            env["SAGE_MAX_LORAS"] = str(args.max_loras)
        settings = Settings.from_env(environ=env)
        print(f"load_bench: {args.kernels} kernels, {args.rounds} rounds of {TOKENS}-token answers, "
              f"SAGE_MAX_LORAS={args.max_loras or 'sized'}, {os.cpu_count()} CPUs, in {workdir}", flush=True)
        kernels = [Kernel(env) for _ in range(args.kernels)]
        cells += round_of(kernels, [FINETUNES[i % len(FINETUNES)] for i in range(len(kernels))])  # start, warm
        alone = load_figures("one kernel alone", kernels[:1], [FINETUNES[0]], args.rounds, cells)
        one = load_figures(f"{len(kernels)} kernels, one fine-tune", kernels, [FINETUNES[0]] * len(kernels),
                           args.rounds, cells)
        mixed = load_figures(f"{len(kernels)} kernels, three fine-tunes", kernels,
                             [FINETUNES[i % len(FINETUNES)] for i in range(len(kernels))], args.rounds, cells)
        report("one fine-tune / one kernel alone", f"{one / alone:.2f}x", "report", None)
        report("three fine-tunes / one kernel alone", f"{mixed / alone:.2f}x", "report", None)
        report("three fine-tunes / one fine-tune", f"{mixed / one:.2f}x", ">= 0.9x", mixed / one >= 0.9)

        manager = Manager(settings)
        # the same number of requests both ways (the one-fine-tune eval asks three times the prompts): what
        # differs is only how many adapters the batches mix, not how long the run is against its ramp-up
        rows = eval_rows(args.prompts)
        evaluate(rows[:2], list(FINETUNES), manager=manager, concurrency=8)  # warm-up, as finetune_bench does
        more = eval_rows(len(FINETUNES) * args.prompts)
        single = statistics.median(eval_rate(manager, more, [FINETUNES[0]], 8) for _ in range(args.rounds))
        several = statistics.median(eval_rate(manager, rows, list(FINETUNES), 8) for _ in range(args.rounds))
        report("eval requests/s, one fine-tune", f"{single:.1f} ({len(more)} requests)", "report", None)
        report("eval requests/s, three fine-tunes", f"{several:.1f} ({3 * len(rows)} requests)", "report", None)
        report("eval three / one", f"{several / single:.2f}x", ">= 0.9x", several / single >= 0.9)

        errors = [c.error for c in cells if c.error]
        servers = Registry(runtime).all()
        report("errors", f"{len(errors)} of {len(cells)} cells", "0", not errors)
        for error in errors[:3]:
            print(f"  {error}")
        slots = [r.lora_slots for r in servers]
        report("servers started", f"{len(servers)} {slots}", "1", len(servers) == 1)
    except Exception:
        traceback.print_exc()
        failed = True
    finally:
        for kernel in kernels:
            kernel.close()
        if manager is not None:
            manager.close()
    return finish(runtime, workdir, failed, patience=30)  # the server stops once the kernels are gone


if __name__ == "__main__":
    sys.exit(main())
