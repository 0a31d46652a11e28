"""`sage feedback list|export|rm`: the answers rated and corrected in notebooks, as data to train on."""

from __future__ import annotations

import argparse
import json

from ..core.config import Settings
from ..faces.text import FEEDBACK_HEADERS, feedback_summary, table


def register(sub: argparse._SubParsersAction) -> None:
    feedback = sub.add_parser("feedback", help="answers rated or corrected in notebooks (list, export, rm)")
    commands = feedback.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="the marked answers, one row per answer")
    listing.add_argument("name", nargs="?", help="only this fine-tune's marks")
    listing.add_argument("--only", choices=("good", "bad", "corrected"), help="only answers rated so, or corrected")
    listing.add_argument("--json", action="store_true", help="machine-readable output, with the messages")
    listing.set_defaults(run=run_list)

    export = commands.add_parser("export", help="write the chat-format training file (axolotl, LLaMA-Factory, TRL)")
    export.add_argument("name", help="the fine-tune whose marks to export")
    export.add_argument("--to", required=True, metavar="FILE.jsonl", help="where to write it")
    export.set_defaults(run=run_export)

    remove = commands.add_parser("rm", help="remove marks by id, fine-tune or age")
    remove.add_argument("ids", nargs="*", metavar="ID", help="mark ids (`sage feedback list --json` shows them)")
    remove.add_argument("--finetune", metavar="NAME", help="every mark of this fine-tune")
    remove.add_argument("--older-than", type=float, metavar="DAYS", help="every mark older than this many days")
    remove.set_defaults(run=run_rm)


def _store(settings: Settings):
    from ..feedback.store import FeedbackStore

    return FeedbackStore(settings.home)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    from ..feedback.data import feedback_rows

    rows = feedback_rows(_store(settings), args.name, args.only)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    print(table(feedback_summary(rows), FEEDBACK_HEADERS) if rows else
          "No marked answers yet. Rate or correct answers in a notebook (`%sage rate`, `%sage correct`, the "
          "chat panel's buttons).")
    return 0


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    from ..feedback.data import export_jsonl

    path, written, left_out = export_jsonl(_store(settings), args.name, args.to)
    note = f" ({left_out} answer(s) rated bad without a correction left out)" if left_out else ""
    print(f"{written} example(s) written to {path}{note}.")
    return 0


def run_rm(args: argparse.Namespace, settings: Settings) -> int:
    removed = _store(settings).remove(ids=args.ids, finetune=args.finetune, older_than_days=args.older_than)
    print(f"Removed {removed} mark(s).")
    return 0
