"""Entry point of the `sage` command.

Every command is a line of :data:`COMMANDS`: its one-line summary and the function that adds its options,
``"module:function"`` in this package. That function is imported only when its command runs, so `sage ps`
never loads the chat client, the RAG code or the training options (people call `sage ps` from scripts;
see benchmarks/cli_bench.py). The function adds its options to the parser it is given and
``set_defaults(run=...)`` where ``run(args, settings) -> int``. Expected failures are :class:`SageError`:
printed as one paragraph, exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from ..core.config import Settings
from ..core.errors import SageError
from ..faces.options import join_option_values

#: name -> ("module:function" that adds the command's options, what `sage --help` says of it), in help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("chat:define", "chat with a fine-tune, a local model or an endpoint"),
    "finetune": ("finetune:define", "list, merge, chat with fine-tunes; build the demo ones"),
    "eval": ("evaluate:define", "evaluate fine-tunes, their base, or endpoints on a table of prompts"),
    "ps": ("servers:define_ps", "list running model servers (like `ollama ps`)"),
    "stop": ("servers:define_stop", "stop a model server, whoever uses it (or unload one adapter)"),
    "logs": ("servers:define_logs", "show the end of a server's log (also of stopped or failed servers)"),
    "index": ("index:define", "document indexes for grounded answers (add, update, list, show, rm, query)"),
    "feedback": ("feedback:define", "answers rated or corrected in notebooks (list, export, rm)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `sage` parser with the options of ``command`` only: the other commands are there by name and
    summary, which is all that `sage --help` and argparse's "invalid choice" message show of them."""
    parser = argparse.ArgumentParser(
        prog="sage",
        description="Serve and chat with your fine-tuned models on real vLLM; ground answers in your documents.",
    )
    parser.add_argument("--home", help="root of fine-tunes, models and indexes (env SAGE_HOME, default ~/.sage)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        add_command(sub, name, with_options=name == command)
    return parser


def add_command(sub: argparse._SubParsersAction, name: str, with_options: bool = True) -> argparse.ArgumentParser:
    """Add command ``name`` to ``sub`` (also the notebook's ``%sage`` parser, which reuses these), importing
    the module that defines its options only ``with_options``."""
    where, summary = COMMANDS[name]
    parser = sub.add_parser(name, help=summary)
    if with_options:
        module, function = where.split(":")
        getattr(importlib.import_module(f".{module}", __package__), function)(parser)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command these words run: the first word that is not an option (`--home` is gone by now, and no
    other option of `sage` itself takes a value), or None for `sage`, `sage --help` and unknown words."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    # --home is accepted anywhere (`sage --home D finetune demo` and `sage finetune demo --home D`)
    home_only = argparse.ArgumentParser(add_help=False)
    home_only.add_argument("--home")
    found, rest = home_only.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        parser = build_parser(chosen_command(rest))  # reads SAGE_DEBUG_* defaults: a bad environment is a SageError
        args = parser.parse_args(join_option_values(rest))
        if not getattr(args, "run", None):
            parser.print_help()
            return 0 if args.command is None else 2
        settings = Settings.from_env(home=found.home)
        return int(args.run(args, settings) or 0)
    except SageError as error:
        print(f"sage: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sage: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `sage finetune list --json | head`: the reader took what it wanted and closed the pipe. Nothing is
        # wrong, so no traceback; stdout goes to /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a command whose pipe was closed


if __name__ == "__main__":
    sys.exit(main())
