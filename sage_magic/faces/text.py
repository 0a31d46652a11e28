"""Text every face shows the same way: plain tables, durations, the server list and the eval summary.

The terminal prints these; the notebook wraps the same rows in HTML. Keeping them here means `sage ps` and
`%sage status` (or `sage eval` and `%sage eval`) can never drift apart, and no face imports another.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ..evals.evaluate import EvalResult
    from ..finetune.train import TrainResult
    from ..serving.servers import ServerStatus

SERVER_HEADERS = ("ID", "NAME", "MODE", "ADAPTERS", "PORT", "PID", "OWNERS", "UP", "MEMORY", "STATE", "UNTIL")
SUMMARY_HEADERS = ("MODEL", "METRIC", "MEAN", "95% CI", "N", "FAILED", "P50 LATENCY", "TOKENS/S")


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Left-aligned plain-text columns, like `ollama ps`."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def duration(seconds: float) -> str:
    """A rough, readable length of time: "45 s", "12 min", "3 h 5 min"."""
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def until(keep_alive: float, idle_until: float | None) -> str:
    """When a server will stop, from its keep-alive and the moment its last user left."""
    if idle_until is not None:
        return f"in {duration(max(0.0, idle_until - time.time()))}"
    if keep_alive < 0:
        return "forever"
    return "while used" if keep_alive == 0 else f"{duration(keep_alive)} after last user"


def server_rows(statuses: Sequence[ServerStatus]) -> list[tuple[object, ...]]:
    """One row per server, in the columns of :data:`SERVER_HEADERS`."""
    rows: list[tuple[object, ...]] = []
    for s in statuses:
        r = s.record
        rows.append((r.id, r.served_name, r.kind if r.kind == "merged" else "lora" if r.adapters else "base",
                     ",".join(sorted(r.adapters)) or "-", r.port or "-", r.pid or "-", s.alive_owners,
                     duration(s.uptime), f"{s.memory_bytes / 2**30:.1f} GiB", s.state,
                     until(r.keep_alive, r.idle_until)))
    return rows


def summary_rows(result: EvalResult) -> list[tuple[object, ...]]:
    """The eval summary people read first, one row per (model, metric): score with its interval, failures,
    speed, in the columns of :data:`SUMMARY_HEADERS`."""
    rows: list[tuple[object, ...]] = []
    for s in result.summary():
        score = "-" if s.mean is None else f"{s.mean:.3f}"
        interval = "-" if s.low is None else f"[{s.low:.3f}, {s.high:.3f}]"
        rows.append((s.model, s.metric, score, interval, s.scored, s.failed,
                     "-" if s.p50_latency is None else f"{s.p50_latency * 1000:.0f} ms",
                     "-" if s.tokens_per_s is None else f"{s.tokens_per_s:.1f}"))
    return rows


def summary_title(result: EvalResult) -> str:
    note = " (interrupted: finished rows only)" if result.cancelled else ""
    return f"{len(result.rows)} prompts x {len(result.models)} models in {result.seconds:.1f} s{note}"


def summary_notes(result: EvalResult) -> list[str]:
    """Lines under the summary: why answers counted in FAILED have no score for a metric (its scorer failed),
    one per metric and reason; a failed request's reason is in the per-prompt results."""
    counts: dict[tuple[str, str], int] = {}
    for row in result.rows:
        for answer in row.answers.values():
            for metric, reason in answer.score_errors.items():
                counts[metric, reason] = counts.get((metric, reason), 0) + 1
    return [f"{metric} not scored for {n} answer{'' if n == 1 else 's'}: {reason}"
            for (metric, reason), n in counts.items()]


def saved_note(path: object) -> str:
    return f"Saved to {path}"


def adapter_note(result: "TrainResult") -> str:
    """Where a training's adapter is, or why this caller has none: a helper machine of a several-machine run
    (machine 0 writes it), or a run stopped before its first checkpoint."""
    if result.adapter_dir is not None:
        return str(result.adapter_dir)
    if result.options.node_rank > 0:
        return f"on machine 0 of {result.options.nnodes} (this is --node-rank {result.options.node_rank})"
    return "none (stopped before its first checkpoint)"
