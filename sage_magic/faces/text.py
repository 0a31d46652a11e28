"""Text every face shows the same way: plain tables, durations, the server list and the eval summary.

The terminal prints these; the notebook wraps the same rows in HTML. Keeping them here means `sage ps` and
`%sage status` (or `sage eval` and `%sage eval`) can never drift apart, and no face imports another.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from ..core.errors import fold

if TYPE_CHECKING:
    from ..evals.evaluate import EvalResult
    from ..finetune.train import TrainResult
    from ..serving.servers import ServerStatus

SERVER_HEADERS = ("ID", "NAME", "MODE", "ADAPTERS", "PORT", "PID", "OWNERS", "UP", "MEMORY", "STATE", "UNTIL")
#: How many adapter names a table cell shows before "and N more" (:func:`fold`'s default).
FOLD_SHOWN = 3
#: What the terminal and the notebook say under a table whose adapter lists were folded.
FOLDED_HINT = "adapter lists are folded: `sage ps --all` (`%sage status --all`) or `--json` lists every one"
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


def folded_adapters(statuses: Sequence[ServerStatus]) -> list[tuple[str, list[str]]]:
    """The servers whose adapter list :func:`server_rows` folded: a title ("ID (NAME): 100 adapters") and
    every name, for `sage ps --all` and the notebook's collapsible lists."""
    return [(f"{s.record.id} ({s.record.served_name}): {len(s.record.adapters)} adapters", sorted(s.record.adapters))
            for s in statuses if len(s.record.adapters) > FOLD_SHOWN + 1]


def adapter_lists(statuses: Sequence[ServerStatus]) -> str:
    """:func:`folded_adapters` as text: a title and the names wrapped under it, per server."""
    import textwrap  # here: `sage ps` imports this module, and only `--all` wraps

    return "\n".join(f"{title}\n{textwrap.fill(', '.join(names), 100, initial_indent='  ', subsequent_indent='  ')}"
                     for title, names in folded_adapters(statuses))


def server_rows(statuses: Sequence[ServerStatus]) -> list[tuple[object, ...]]:
    """One row per server, in the columns of :data:`SERVER_HEADERS`. A base server's adapters are counted
    and folded (:func:`~sage_magic.core.errors.fold`), so a hundred fine-tunes keep the table readable."""
    rows: list[tuple[object, ...]] = []
    for s in statuses:
        r = s.record
        count = f"{len(r.adapters)}: " if len(r.adapters) > FOLD_SHOWN + 1 else ""
        rows.append((r.id, r.served_name, r.kind if r.kind == "merged" else "lora" if r.adapters else "base",
                     count + fold(sorted(r.adapters)) or "-", r.port or "-", r.pid or "-", s.alive_owners,
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


FEEDBACK_HEADERS = ("TIME", "FINE-TUNE", "RATING", "PROMPT", "ANSWER", "CORRECTION")


def feedback_summary(rows: Sequence[dict]) -> list[tuple[str, ...]]:
    """Marked answers (feedback.data rows) as short table rows, text cut to 40 characters: `sage feedback
    list` and `%sage feedback`."""
    def cut(text: object) -> str:
        value = " ".join(str(text or "").split())
        return value if len(value) <= 40 else value[:39] + "…"
    return [(r["time"], r["finetune"] or r["model"], r["rating"] or "-", cut(r["prompt"]), cut(r["answer"]),
             cut(r["correction"]) or "-") for r in rows]


def adapter_note(result: "TrainResult") -> str:
    """Where a training's adapter is, or why this caller has none: a helper machine of a several-machine run
    (machine 0 writes it), or a run stopped before its first checkpoint."""
    if result.adapter_dir is not None:
        return str(result.adapter_dir)
    if result.options.node_rank > 0:
        return f"on machine 0 of {result.options.nnodes} (this is --node-rank {result.options.node_rank})"
    return "none (stopped before its first checkpoint)"
