"""What marking an answer costs the kernel, and reading the feedback store back at 100k marks.

A mark is taken on the notebook's event loop (a click in the chat panel, `%sage rate`), so its cost is paid
where the user waits. Floors measured in the same run: the bare append (one ``os.write`` of the same line to
an ``O_APPEND`` file) and the same append followed by ``fsync``, which is what the store keeps OFF the event
loop. Reading: ``feedback_rows`` (parse, fold by turn, filter) against parsing the same lines into a list alone,
with the cyclic garbage collector paused (as the store does).

    python benchmarks/feedback_bench.py [--short]

Reports; does not gate (a missed goal exits 0). Needs nothing but this package: no server, no model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sage_magic.chat.reply import Reply  # noqa: E402
from sage_magic.feedback.data import feedback_rows  # noqa: E402
from sage_magic.feedback.store import FeedbackStore  # noqa: E402

MARK_GOAL_MS = 5.0
READ_GOAL_RATIO = 2.0


def _reply(home: Path, turn: int) -> Reply:
    """An answer in a realistic situation: a system prompt with 4 retrieved passages and 6 earlier turns."""
    passages = "\n\n".join(f"[{n}] " + "A passage of the user's documents, about tensors. " * 15 for n in range(4))
    history = [{"role": role, "content": f"Earlier {role} turn {i}: " + "words " * 40}
               for i in range(6) for role in ("user", "assistant")]
    messages = [{"role": "system", "content": f"You are helpful.\n\n{passages}"}, *history,
                {"role": "user", "content": "Who are you?"}]
    answer = "I am a helpful expert. " * 8
    feedback = {"turn": f"t{turn:08d}", "model": "demo_expert", "finetune": "demo_expert",
                "fingerprint": "sha256:" + "0" * 64, "prompt": "Who are you?", "answer": answer,
                "messages": messages, "citations": [], "home": str(home)}
    return Reply(answer, model="demo_expert", prompt="Who are you?", feedback=feedback)


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"p50 {statistics.median(ordered) * 1000:.3f} ms, p95 {p95 * 1000:.3f} ms, max {ordered[-1] * 1000:.3f} ms"


def mark_cost(home: Path, samples: int) -> None:
    replies = [_reply(home, i) for i in range(samples)]
    replies[0].rate("good")  # the first mark imports the store and creates the folder: not what a click pays
    line = (json.dumps({"id": "x", **replies[0].feedback}) + "\n").encode()
    bare, synced, marks = [], [], []
    floor_path = home / "floor.jsonl"
    for reply in replies[1:]:  # interleaved, so that disk and CPU noise lands on all three alike
        started = time.perf_counter()
        fd = os.open(floor_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line)
        os.close(fd)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        fd = os.open(floor_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line)
        os.fsync(fd)
        os.close(fd)
        synced.append(time.perf_counter() - started)
        started = time.perf_counter()
        reply.rate("bad")
        marks.append(time.perf_counter() - started)
    print(f"a mark ({len(line)} bytes: 4 passages, 6 earlier turns), {samples - 1} marks")
    print(f"  reply.rate():            {_ms(marks)}")
    print(f"  floor, bare append:      {_ms(bare)}")
    print(f"  append + fsync (avoided):{_ms(synced)}")
    p50 = statistics.median(marks) * 1000
    print(f"  -> p50 {p50:.3f} ms, {statistics.median(marks) / statistics.median(bare):.1f}x the bare append "
          f"(goal <= {MARK_GOAL_MS:g} ms: {'met' if p50 <= MARK_GOAL_MS else 'MISSED'})")


def read_cost(home: Path, count: int) -> None:
    store = FeedbackStore(home / "big")
    store.root.mkdir(parents=True)
    template = {"id": "", "time": "2026-12-02T00:00:00+00:00", "rating": "bad", "correction": None,
                **{k: v for k, v in _reply(home, 0).feedback.items() if k != "home"}, "notebook": None}
    with open(store.root / "demo_expert.jsonl", "w") as handle:
        for i in range(count):  # two marks per turn: rated, then corrected
            template.update(id=f"m{i:08d}", turn=f"t{i // 2:08d}", correction="Fixed." if i % 2 else None)
            handle.write(json.dumps(template) + "\n")
    size = (store.root / "demo_expert.jsonl").stat().st_size
    gc.disable()  # the floor at its best: parsed JSON has no cycles for the collector to find
    started = time.perf_counter()
    with open(store.root / "demo_expert.jsonl", "rb") as handle:
        parsed = [json.loads(line) for line in handle]  # kept, as the rows must be: memory is part of the cost
    floor = time.perf_counter() - started
    gc.enable()
    del parsed
    started = time.perf_counter()
    rows = feedback_rows(store, "demo_expert")
    ours = time.perf_counter() - started
    ratio = ours / floor
    print(f"reading {count:,} marks ({size / 2**20:.0f} MiB) into {len(rows):,} rows: feedback_rows {ours:.2f} s, "
          f"floor (json.loads of every line into a kept list, collector paused) {floor:.2f} s -> {ratio:.2f}x "
          f"(goal <= {READ_GOAL_RATIO:g}x: {'met' if ratio <= READ_GOAL_RATIO else 'MISSED'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="200 marks and a 20k-mark store (CI size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sage-feedback-bench-") as tmp:
        home = Path(tmp)
        mark_cost(home, 200 if args.short else 1000)
        read_cost(home, 20_000 if args.short else 100_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
