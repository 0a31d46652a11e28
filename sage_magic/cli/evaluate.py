"""`sage eval FILE --models A,B,base`: answer a table of prompts with several models and score them."""

from __future__ import annotations

import argparse
import json
import sys

from ..chat.backends import attach_options, remote_endpoint
from ..core.config import Settings
from ..core.errors import SageError
from ..core.tables import read_table
from ..evals.evaluate import EvalInterrupted, EvalResult, check_save_path, evaluate, items_from_table
from ..faces.options import add_eval_options, model_names
from ..faces.text import SUMMARY_HEADERS, saved_note, summary_notes, summary_rows, summary_title, table
from ..serving.manager import Manager
from ..tracking.report import check_installed, log_eval, trackers
from .output import TerminalProgress


def define(parser: argparse.ArgumentParser) -> None:
    """`sage eval`'s options (main.COMMANDS)."""
    parser.add_argument("data", metavar="FILE", help=".csv, .jsonl or .parquet with a prompt column")
    add_eval_options(parser)
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the results (partial after Ctrl-C: exit 130), then save and log them: a failed save or log is
    reported after the results it could not keep (exit 2), never instead of them."""
    items = items_from_table(read_table(args.data), args.prompt_col, args.expected_col)
    if args.save:
        check_save_path(args.save)
    check_installed(settings.python, args.report_to)
    progress = TerminalProgress()
    manager = Manager(settings)
    try:
        result = evaluate(items, model_names(args.models), manager=manager, remote=remote_endpoint(args),
                          attach=attach_options(args, settings),
                          metrics=args.metrics, concurrency=args.concurrency, seed=args.seed,
                          max_tokens=args.max_tokens, temperature=args.temperature, system=args.system,
                          embedder=settings.embedder, progress=progress)
    except EvalInterrupted as stop:
        result = stop.result
    finally:
        progress.close()
        manager.close(wait=True)
    print(json.dumps(result.to_json(), indent=1) if args.json else render_summary(result), flush=True)
    status = 130 if result.cancelled else 0
    keep = [lambda: saved_note(result.save(args.save))] if args.save else []
    if "mlflow" in trackers(args.report_to):
        keep.append(lambda: log_eval(settings, result))
    for step in keep:
        try:
            print(step(), file=sys.stderr)
        except SageError as error:
            print(f"sage: {error}", file=sys.stderr)
            status = status or 2
    return status


def render_summary(result: EvalResult) -> str:
    """The summary table as terminal text, with the reasons of unscored answers under it."""
    return "\n".join([summary_title(result), table(summary_rows(result), SUMMARY_HEADERS), *summary_notes(result)])
