"""`sage eval FILE --models A,B,base`: answer a table of prompts with several models and score them."""

from __future__ import annotations

import argparse
import json

from ..chat.backends import remote_endpoint
from ..core.config import Settings
from ..core.tables import read_table
from ..evals.evaluate import EvalResult, evaluate, items_from_table
from ..faces.options import add_eval_options, model_names
from ..faces.text import SUMMARY_HEADERS, summary_rows, summary_title, table
from ..serving.manager import Manager
from .output import TerminalProgress


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


def render_summary(result: EvalResult) -> str:
    """The summary table as terminal text."""
    return summary_title(result) + "\n" + table(summary_rows(result), SUMMARY_HEADERS)
