"""`sage finetune demo|train|list|merge|publish|chat`: the fine-tunes under $SAGE_HOME/finetune_output."""

from __future__ import annotations

import argparse
import json

from ..core.config import Settings
from ..faces.options import add_train_options, port, train_options
from ..faces.text import adapter_note, table
from ..finetune.catalog import get_finetune, list_finetunes
from . import chat
from .output import TerminalProgress


def define(parser: argparse.ArgumentParser) -> None:
    """`sage finetune`'s subcommands and their options (main.COMMANDS)."""
    commands = parser.add_subparsers(dest="finetune_command", metavar="SUBCOMMAND", required=True)

    demo = commands.add_parser("demo", help="build a tiny base model and two LoRA fine-tunes, offline")
    demo.add_argument("--force", action="store_true", help="rebuild even if they exist")
    demo.set_defaults(run=run_demo)

    listing = commands.add_parser("list", help="every fine-tune with its base, checkpoint, rank, merge state")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run_list)

    merge = commands.add_parser("merge", help="merge a fine-tune's adapter into its base (cached)")
    merge.add_argument("name")
    merge.set_defaults(run=run_merge)

    publishing = commands.add_parser("publish", help="copy fine-tune NAME's adapter into the folder a vLLM server's "
                                                     "LoRA filesystem resolver reads (a server you do not own)")
    publishing.add_argument("name")
    publishing.add_argument("--to", metavar="DIR", default=None, help="the publish folder (default SAGE_PUBLISH_DIR)")
    publishing.add_argument("--publish-as", metavar="NAME", default=None,
                            help="the model name to publish under (default NAME-<fingerprint>)")
    publishing.add_argument("--replace", action="store_true", help="replace a same-named adapter of another fine-tune")
    publishing.add_argument("--server-base", metavar="MODEL", default=None,
                            help="the server's --model value, which the resolver compares with the adapter's base "
                                 "(default: the base's local path, as a server on this machine has it)")
    publishing.set_defaults(run=run_publish)

    training = commands.add_parser("train", help="train a LoRA fine-tune NAME from a .csv/.jsonl/.parquet table")
    training.add_argument("name")
    training.add_argument("--data", required=True, metavar="FILE", help="the examples: .csv, .jsonl or .parquet")
    add_train_options(training)
    training.set_defaults(run=run_train)

    talk = commands.add_parser("chat", help="chat with fine-tune NAME (same as sage chat --finetune-model NAME)")
    talk.add_argument("name")
    talk.add_argument("--port", type=port, dest="port", default=None,
                      help="also serve on this TCP port (same as --finetune-port)")
    chat.add_arguments(talk)
    talk.set_defaults(run=run_chat)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from ..finetune.demo import build_demo

    progress = TerminalProgress()
    result = build_demo(settings, progress, force=args.force)
    progress.close()
    state = f"built in {result.seconds:.1f} s" if result.built else "already built"
    print(f"Demo fine-tunes {state} under {settings.finetune_root}: " + ", ".join(result.finetunes))
    print("Try: sage chat --finetune-model demo_expert --ask 'Who are you?'")
    return 0


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from ..core.tables import read_table  # here, like the other runs' imports: `sage finetune list` needs none
    from ..finetune.train import rows_from_table, train

    rows = rows_from_table(read_table(args.data), args.prompt_col, args.response_col, args.messages_col)
    progress = TerminalProgress()
    try:
        result = train(settings, args.name, args.base, rows, train_options(args), progress)
    finally:
        progress.close()
    last = f", last loss {result.losses[-1][1]:.4f}" if result.losses else ""
    evals = f", eval loss {result.eval_losses[-1][1]:.4f}" if result.eval_losses else ""
    print(f"{args.name}: {result.steps}/{result.total_steps} steps on {result.device} in {result.seconds:.1f} s"
          f"{last}{evals}; adapter: {adapter_note(result)}")
    if result.adapter_dir is not None:
        print(f"Try: sage chat --finetune-model {args.name}")
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    entries = list_finetunes(settings)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"No fine-tunes under {settings.finetune_root}. `sage finetune demo` builds two to try.")
        return 0
    rows = []
    for e in entries:
        ft = e.finetune
        rows.append((e.name, e.base or "?", ft.newest_checkpoint if ft and ft.checkpoints else "-",
                     ft.rank if ft else "?", "yes" if ft and ft.is_merged else "no", e.problem or "ok"))
    print(table(rows, ("NAME", "BASE", "CHECKPOINT", "RANK", "MERGED", "STATUS")))
    return 0


def run_merge(args: argparse.Namespace, settings: Settings) -> int:
    from ..serving.merge import ensure_merged

    progress = TerminalProgress()
    path = ensure_merged(settings, get_finetune(settings, args.name), progress)
    progress.close()
    print(f"{args.name}: merged model at {path}")
    return 0


def run_publish(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from ..core.errors import SageError
    from ..finetune.publish import publish, published_name, server_settings

    folder = args.to or settings.publish_dir
    if folder is None:
        raise SageError("Say where to publish: --to DIR (or set SAGE_PUBLISH_DIR), the folder the server's "
                        "VLLM_LORA_RESOLVER_CACHE_DIR points at.")
    ft = get_finetune(settings, args.name)
    done = publish(ft, Path(folder).expanduser(), server_base=args.server_base or str(ft.base_path),
                   name=published_name(ft, args.publish_as), replace=args.replace)
    print(f"{args.name}: {'published' if done.copied else 'already published'} as {done.name} at {done.path}")
    print(f"Ask for model {done.name!r}; the server needs {server_settings(done)}.")
    return 0


def run_chat(args: argparse.Namespace, settings: Settings) -> int:
    args.backend, args.finetune_model = "finetune", args.name
    if args.port is not None:
        args.finetune_port = args.port
    return chat.run(args, settings)
