"""How the notebook face reads its lines: ``%%sage`` options, ``%sage`` subcommands, and their help.

Options come from faces/options.py (the flags of ``sage chat``) plus the notebook-only ones; mistakes raise
:class:`OptionError` with the option's own help, never ``SystemExit`` (argparse's habit would end the kernel).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Any, NoReturn

from IPython.core.error import UsageError

FORMATS = ("markdown", "md", "text", "code", "json", "html", "math")  # render.FORMATS, kept import-free here
#: `%sage` subcommands answered in the kernel, and CLI commands run as `sage ...` in a child process (they
#: build indexes or merge weights: torch must stay out of the kernel).
SUBCOMMANDS = ("status", "stop", "logs", "models", "indexes", "history", "reset", "export", "error", "rate",
               "correct", "feedback", "help")
CHILD_COMMANDS = ("index", "finetune")
#: The fine-tune loop: training in a background thread over a child process (finetune_cells.py), and eval
#: (eval_cells.py).
LOOP_COMMANDS = {("finetune", "train"): "train", ("finetune", "watch"): "watch", ("finetune", "stop"): "stop",
                 ("eval",): "eval"}
LINE_HELP = """\
%sage SUBCOMMAND (each the twin of a `sage` command, with its options):
  status [--json]          running model servers (sage ps)
  stop [ID | --all]        stop a server, whoever uses it; bare: the ones this session started
  logs [ID] [-n N]         end of a server's log; default: this session's server (sage logs)
  models [--json]          the fine-tunes and their bases (sage finetune list)
  indexes [--json]         the document indexes (sage index list)
  history                  the conversation so far
  reset                    forget the conversation (servers keep running)
  export PATH              transcript with citations and figures, .md or .json
  error [options]          explain the last failed cell's error with the model (options as %%sage)
  rate good|bad [N]        mark answer N of this session (default the last; -2 the one before) in the
                           feedback store, under SAGE_HOME/feedback/
  correct [N] [--text T]   write the answer N should have been: an editor under the cell, prefilled with it
  feedback [NAME] [--only good|bad|corrected] [-o VAR]
                           the marked answers as a table (a DataFrame in VAR: train on it with
                           `%sage finetune train NEW --data VAR`, test with `%sage eval VAR --models ...`);
                           feedback export NAME --to FILE.jsonl | feedback rm [ID...] [--finetune N] [--older-than D]
  help                     this text
  finetune train NAME --base BASE --data DATAFRAME [--background] [training options]
                           train a LoRA from a DataFrame (prompt/response or messages columns) in a child
                           process, with a progress bar and a live loss curve; interrupt to stop cleanly
  finetune watch [NAME]    show a --background training's progress in this cell (interrupt: stop watching)
  finetune stop [--now] [NAME]
                           stop a training of this kernel cleanly (its last checkpoint stays usable); --now kills it
  eval DATAFRAME --models A,B,base [--metric M] [-o VAR] [--diff]
                           every prompt to every model, concurrently; summary table and bar chart
  index add|update|show|rm|query ... and finetune demo|merge ...: run as `sage ...` in a child process,
                           so building an index or merging weights never loads torch into the kernel.
%sage_chat [options]       a chat panel on the same session, one per cell: the options of %%sage except
                           --compare and -f; with no model, pick a fine-tune in the panel.
Defaults: %config SageMagics.<name> = value (`%config SageMagics` lists them)."""
_ALIASES = {"status": ["ps"], "models": ["finetune", "list"], "indexes": ["index", "list"]}
FEEDBACK_ACTIONS = ("list", "export", "rm")


class OptionError(UsageError):
    """A mistake in a magic's options. Unlike a plain UsageError (printed to stderr, which nbval does not count
    as a failure) it is shown as the cell's error output, so every notebook runner sees the failed cell."""

    def _render_traceback_(self) -> list[str]:
        """IPython's hook for an exception's own traceback: the message alone, as IPython shows a UsageError."""
        return [f"\x1b[0;31mUsageError\x1b[0m: {self}"]


class HelpRequested(Exception):
    """-h/--help was given: the help is printed and nothing runs."""


class MagicParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (never exits the kernel) and adds the option's own help."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        match = re.search(r"argument ((?:-\w|--[\w-]+))", message)
        action = self._option_string_actions.get(match.group(1)) if match else None
        if action is not None and action.help:
            hint = f"\n  {', '.join(action.option_strings)}: {action.help}"
        raise OptionError(f"{self.prog}: {message}{hint}\n{self.format_usage().strip()}\n"
                         "`%sage help` lists every option.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise OptionError(message)
        raise HelpRequested

    def print_help(self, file: Any = None) -> None:
        print(self.format_help(), file=file or sys.stdout)


def split(line: str) -> list[str]:
    """The magic's words, with ``--vllm-arg --flag`` joined the way the CLI joins them (faces/options.py)."""
    from ..faces.options import join_option_values

    try:
        return join_option_values(shlex.split(line))
    except ValueError as error:
        raise OptionError(f"Cannot read the options {line!r}: {error} (quote values with spaces).") from None


def cell_parser(settings: Any = None) -> MagicParser:
    """The flags of ``sage chat`` plus the notebook-only ones."""
    from ..faces.options import option_parser

    parser = option_parser(settings, MagicParser)
    parser.prog = "%%sage"
    group = parser.add_argument_group("notebook")
    group.add_argument("-f", "--format", choices=FORMATS, default=None,
                       help="how to render the answer (default: %%config SageMagics.default_format, markdown); "
                            "code also inserts the code as the next cell")
    group.add_argument("-o", "--output", metavar="VAR", type=identifier,
                       help="store the answer in VAR: a str carrying .model, .citations, .metrics")
    group.add_argument("--compare", metavar="A,B,base",
                       help="stream the prompt to several fine-tunes of one base (base = the base model) side "
                            "by side")
    group.add_argument("--new-chat", action="store_true", help="forget the conversation before this cell")
    group.add_argument("--no-interpolate", action="store_true",
                       help="send {var}, {In[n]}, {Out[n]}, {Err[n]} as written instead of filling them in")
    group.add_argument("-h", "--help", action="store_true", help="show this help")
    return parser


def notebook_variable(ns: dict[str, Any], name: str, what: str) -> Any:
    """The value a ``VAR`` option names in the user's namespace, or one paragraph saying what to pass."""
    from ..core.errors import SageError

    if name not in ns:
        raise SageError(f"There is no variable {name!r} in this notebook. {what}")
    return ns[name]


def identifier(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


def line_parser() -> MagicParser:
    """``%sage SUBCOMMAND``: the CLI's own parsers for ps/stop/logs/finetune/index, plus the session's."""
    from ..cli import feedback, finetune, index, servers

    parser = MagicParser(prog="%sage", add_help=False)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=MagicParser)
    for module in (servers, finetune, index, feedback):
        module.register(sub)
    feedback_list = next(a for a in sub.choices["feedback"]._actions
                         if isinstance(a, argparse._SubParsersAction)).choices["list"]
    feedback_list.add_argument("-o", "--output", metavar="VAR", type=identifier,
                               help="store the table as a pandas DataFrame in VAR")
    sub.choices["stop"]._mutually_exclusive_groups[0].required = False  # bare `%sage stop`: what we started
    for action in sub.choices["logs"]._actions:
        if action.dest == "id":  # in a notebook the server of this session is the natural default
            action.nargs, action.required, action.default = "?", False, None
    sub.add_parser("history", help="the conversation so far")
    sub.add_parser("reset", help="forget the conversation (servers keep running)")
    export = sub.add_parser("export", help="write the transcript with citations and figures (.md or .json)")
    export.add_argument("path")
    rate = sub.add_parser("rate", help="mark an answer of this session good or bad")
    rate.add_argument("rating", choices=("good", "bad"))
    rate.add_argument("number", nargs="?", type=int, metavar="N", help="which answer (default the last)")
    correct = sub.add_parser("correct", help="write the answer the model should have given")
    correct.add_argument("number", nargs="?", type=int, metavar="N", help="which answer (default the last)")
    correct.add_argument("--text", help="the correction itself (else an editor opens, prefilled with the answer)")
    sub.add_parser("help", help="the options of %%%%sage and the %%sage subcommands")
    return parser
