"""`sage eval FILE --models A,B,base`: answer a table of prompts with several models and score them."""

from __future__ import annotations

import argparse
import json

from ..config import Settings
from ..evaluate import EvalResult, evaluate, items_from_table
from ..manager import Manager
from ..options import add_eval_options, model_names, remote_endpoint
from ..tables import read_table
from .output import TerminalProgress, table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate fine-tunes, their base, or endpoints on a table of prompts")
    parser.add_argument("data", metavar="FILE", help=".csv, .jsonl or .parquet with a prompt column")
    add_eval_options(parser)
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    items = items_from_table(read_table(args.data), args.prompt_col, args.expected_col)
    progress = TerminalProgress()
    manager = Manager(settings)
    try:
        result = evaluate(items, model_names(args.models), manager=manager, remote=remote_endpoint(args),
                          metrics=args.metrics, concurrency=args.concurrency, seed=args.seed,
                          max_tokens=args.max_tokens, temperature=args.temperature, system=args.system,
                          embedder=settings.embedder, progress=progress)
    finally:
        progress.close()
        manager.close(wait=True)
    if args.save:
        print(f"Saved to {result.save(args.save)}")
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(render_summary(result))
    return 130 if result.cancelled else 0


SUMMARY_HEADERS = ("MODEL", "METRIC", "MEAN", "95% CI", "N", "FAILED", "P50 LATENCY", "TOKENS/S")


def summary_rows(result: EvalResult) -> list[tuple[object, ...]]:
    """The summary people read first, one row per (model, metric): score with its interval, failures, speed.
    Shared by the terminal table here and the notebook's HTML table (``%sage eval``)."""
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


def render_summary(result: EvalResult) -> str:
    """The summary table as terminal text."""
    return summary_title(result) + "\n" + table(summary_rows(result), SUMMARY_HEADERS)
