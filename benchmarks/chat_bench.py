"""Chat benchmark: how fast a Stop (a cancel set from another thread) ends an answer in each phase, and what
fitting a long history to the model's window costs, on a real vLLM server with demo_expert.

Why a script and not a test: the contract ("a cancel ends ``ask`` within 0.5 s in every phase") is a time,
and times depend on the machine and its load; they are printed with their goal and a miss does not fail
the run. An error does (exit 1), and so does a vLLM process left behind. Shares engine_bench's home,
settings, summary and cleanup.

    python benchmarks/chat_bench.py                       # builds the demo in a temp home
    python benchmarks/chat_bench.py --home /tmp/mydemo    # on a copy of an existing demo home
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from engine_bench import Figure, Run, cleanup, ms, prepare_home, print_summary, settings_for

from sage_magic.chat.client import ChatClient
from sage_magic.chat.conversation import Conversation
from sage_magic.core.endpoint import Endpoint
from sage_magic.finetune.catalog import get_finetune
from sage_magic.serving.manager import Manager

GOAL = 0.5  # seconds from the cancel to ``ask`` returning (the Stop-button contract)
SENTENCE = "The adapter is loaded on its shared base server and answers questions about SAGE. "


def cancel_latency(ask: Callable[[threading.Event, threading.Event], object], samples: int) -> list[float]:
    """Seconds from ``cancel.set()`` in another thread to ``ask`` returning. ``ask(cancel, ready)`` sets
    ``ready`` when it has reached the phase to interrupt; the other thread cancels then."""
    latencies = []
    for _ in range(samples):
        cancel, ready = threading.Event(), threading.Event()
        pressed: list[float] = []

        def press() -> None:
            ready.wait(60)
            pressed.append(time.perf_counter())
            cancel.set()

        threading.Thread(target=press, daemon=True).start()
        answer = ask(cancel, ready)
        latencies.append(time.perf_counter() - pressed[0])
        assert getattr(answer, "cancelled", True), "the answer finished before the cancel: nothing was measured"
    return latencies


def add_latency(run: Run, name: str, latencies: list[float]) -> None:
    worst = max(latencies)
    run.add(Figure(f"{name} (worst of {len(latencies)})", ms(worst), f"<= {GOAL * 1000:.0f} ms", worst <= GOAL))


def bench_hung_server(run: Run, samples: int) -> None:
    """A server that accepts and never sends a byte (no real server can be made to do this on demand)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(samples)
    client = ChatClient(Endpoint(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "k", "m"), timeout=60)

    def ask(cancel: threading.Event, ready: threading.Event):
        threading.Timer(0.1, ready.set).start()
        return client.stream([{"role": "user", "content": "hi"}], cancel=cancel)

    add_latency(run, "cancel while a server holds its first byte", cancel_latency(ask, samples))
    listener.close()


def bench_real(run: Run, endpoint: Endpoint, samples: int) -> None:
    settings = settings_for(run.home, run.workdir / "unused")
    client = ChatClient(endpoint)
    long_question = "Please summarise: " + SENTENCE * 70  # ~1800 tokens of a 2048 window

    def during_prefill(cancel: threading.Event, ready: threading.Event):
        threading.Timer(0.05, ready.set).start()  # the request is on its way, the first token is not
        return Conversation(client, settings).ask(long_question, max_tokens=128, cancel=cancel)

    def mid_stream(cancel: threading.Event, ready: threading.Event):
        return Conversation(client, settings).ask("Tell me a long story about tensors.", temperature=1.5,
                                                  seed=1, max_tokens=1024, cancel=cancel,
                                                  on_delta=lambda delta: ready.set())

    fresh = Conversation(client, settings).ask("Who are you?")
    add_latency(run, "cancel 50 ms after asking 1800 tokens (real vLLM)", cancel_latency(during_prefill, samples))
    add_latency(run, "cancel mid-stream (real vLLM)", cancel_latency(mid_stream, samples))
    after = Conversation(client, settings).ask("Who are you?")
    first, later = fresh.stream.time_to_first_token, after.stream.time_to_first_token
    run.add(Figure("first token right after the cancels (vLLM aborted them)",
                   f"{ms(later)} (first answer of the run: {ms(first)})"))

    short = Conversation(client, settings)
    long = Conversation(client, settings)
    long.history = [{"role": role, "content": f"{n}: {SENTENCE * 3}"} for n in range(40)
                    for role in ("user", "assistant")]
    started = time.perf_counter()
    short.ask("Who are you?", max_tokens=16)
    plain = time.perf_counter() - started
    started = time.perf_counter()
    trimmed = long.ask("Who are you?", max_tokens=16).trimmed_turns
    run.add(Figure(f"ask with a 40-turn history ({trimmed} turns trimmed, /tokenize probes included)",
                   f"{ms(time.perf_counter() - started)} vs {ms(plain)} with none"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="copy this demo home instead of building the demo")
    parser.add_argument("--samples", type=int, default=5, help="cancels measured per phase (default 5)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sage-chat-bench-"))
    home = prepare_home(args.home.expanduser().resolve() if args.home else None, workdir)
    settings = settings_for(home, workdir / "run")
    run = Run(workdir, home, get_finetune(settings, "demo_expert").base_path, [], set(), [])
    failed = True
    try:
        bench_hung_server(run, args.samples)
        manager = Manager(settings)
        run.managers.append(manager)
        bench_real(run, manager.serve_finetune("demo_expert").endpoint, args.samples)
        failed = False
    except Exception:  # noqa: BLE001 - report it, clean up, and exit 1 below
        traceback.print_exc()
    left = cleanup(run)
    run.add(Figure("our vLLM processes left at the end", str(len(left)), "0", not left))
    if not failed and not left:
        shutil.rmtree(workdir, ignore_errors=True)
    print_summary(run.figures)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
