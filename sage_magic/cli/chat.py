"""`sage chat`: stream answers from a fine-tune (or any endpoint) in the terminal; SAGE-compatible flags."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..core.config import Settings
from ..core.errors import SageError
from ..faces.options import add_chat_options, add_serving_options
from ..faces.text import table
from .output import TerminalProgress

if TYPE_CHECKING:
    from ..chat.conversation import Answer, Conversation

PROMPT = "you> "


def define(parser: argparse.ArgumentParser) -> None:
    """`sage chat`'s options (main.COMMANDS)."""
    parser.description = ("Chat with a fine-tune served by vLLM (started, reused and stopped for you). "
                          "Interactive unless --ask is given; /help lists the commands.")
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of a chat, shared by `sage chat` and `sage finetune chat`."""
    add_serving_options(parser, Settings.from_env())
    add_chat_options(parser)
    parser.add_argument("--ask", metavar="QUESTION", help="ask one question, print the answer, clean up, exit")


def run(args: argparse.Namespace, settings: Settings) -> int:
    # imported here, not above: `sage finetune list` and every --help import this module for its options
    from ..chat.backends import ask_options, open_endpoint
    from ..chat.client import ChatClient
    from ..chat.conversation import Conversation
    from ..rag.store import read_manifest
    from ..serving.manager import Manager

    if args.index is not None:  # a missing index must not cost a server start first
        read_manifest(settings, args.index)
    progress = TerminalProgress()
    manager = Manager(settings)
    try:
        lease = open_endpoint(manager, args, progress=progress, cancel=None)
        progress.close()
        try:
            conversation = Conversation(ChatClient(lease.endpoint), settings, system_prompt=args.system)
            if args.ask is not None:
                show(conversation.ask(args.ask, **ask_options(args), on_delta=_write), args)
                return 0
            return interactive(conversation, args, ask_options(args), lease.endpoint.model)
        finally:
            lease.release()
    finally:
        manager.close(wait=True)  # a one-shot --ask must not leave its server behind when it returns


COMMANDS = {
    "/help": "list these commands",
    "/history": "show what the model remembers of this chat",
    "/reset": "forget the chat so far",
    "/exit": "leave (so do /quit and Ctrl-D)",
    "/quit": "leave",
}


def interactive(conversation: Conversation, args: argparse.Namespace, asking: dict[str, Any], model: str) -> int:
    """Read questions until /exit, /quit, Ctrl-D or Ctrl-C at the prompt, asking each with ``asking`` (the
    options of the chat, chat.backends.ask_options). A line starting with / is a command, never a question;
    Ctrl-C during an answer stops that answer only."""
    print(f"Chatting with {model}. /help lists the commands, /exit leaves.", file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if not command:
            continue
        if command.startswith("/"):
            if command in ("/exit", "/quit"):
                return 0
            if command == "/help":
                print("\n".join(f"  {name:<9} {what}" for name, what in COMMANDS.items()), file=sys.stderr)
            elif command == "/reset":
                conversation.reset()
                print("(history cleared)", file=sys.stderr)
            elif command == "/history":
                print(history_text(conversation.history), file=sys.stderr)
            else:
                print(f"sage: unknown command {command.split()[0]!r}; /help lists the commands (nothing was "
                      "sent to the model).", file=sys.stderr)
            continue
        try:
            show(conversation.ask(line, **asking, on_delta=_write), args)
        except KeyboardInterrupt:
            print("\n(stopped; the partial answer above is kept in the history)", file=sys.stderr)
        except SageError as error:
            print(f"sage: {error}", file=sys.stderr)


def history_text(history: list[dict]) -> str:
    """One line per remembered message, cut to the terminal's usual width."""
    if not history:
        return "(no history)"
    lines = []
    for turn in history:
        who = "you" if turn["role"] == "user" else "model"
        text = " ".join(turn["content"].split())
        text = text if len(text) <= 90 else text[:89] + "…"
        lines.append(f"  {who}: {text}{' (stopped)' if turn.get('stopped') else ''}")
    return "\n".join(lines)


def _write(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def show(answer: Answer, args: argparse.Namespace) -> None:
    """After the streamed text: what was cut, the sources, and the figures."""
    print()
    if answer.cancelled:
        print("(stopped; the partial answer above is kept in the history)", file=sys.stderr)
    if args.show_context and answer.context:
        print("--- context sent to the model ---\n" + answer.context + "\n---", file=sys.stderr)
    if args.index is not None:
        if answer.citations:
            rows = [(f"[{c.n}]", c.source, c.location, f"{c.score:.3f}") for c in answer.citations]
            print(table(rows, ("ref", "file", "where", "score")))
        else:
            print(f"(no passages from index {args.index!r} were used)")
        if answer.dropped_chunks:
            print(f"({answer.dropped_chunks} retrieved chunk(s) dropped: they would not fit the model's context)")
    if answer.trimmed_turns:
        print(f"({answer.trimmed_turns} oldest turn(s) dropped from the history to fit the model's context)",
              file=sys.stderr)
    s = answer.stream
    figures = [f"{s.prompt_tokens} prompt tokens" if s.prompt_tokens is not None else None,
               f"{s.completion_tokens} tokens" if s.completion_tokens is not None else None,
               f"first token {s.time_to_first_token * 1000:.0f} ms" if s.time_to_first_token is not None else None,
               f"{s.tokens_per_second:.1f} tok/s" if s.tokens_per_second else None]
    print("(" + ", ".join(f for f in figures if f) + ")", file=sys.stderr)
