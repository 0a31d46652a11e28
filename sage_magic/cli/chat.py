"""`sage chat`: stream answers from a fine-tune (or any endpoint) in the terminal; SAGE-compatible flags."""

from __future__ import annotations

import argparse
import sys

from ..config import Settings
from ..conversation import Answer, Conversation
from ..errors import SageError
from ..manager import Manager
from ..options import add_chat_options, add_serving_options, open_endpoint
from .output import TerminalProgress, table

PROMPT = "you> "


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("chat", help="chat with a fine-tune, a local model or an endpoint",
                            description="Chat with a fine-tune served by vLLM (started, reused and stopped for "
                                        "you). Interactive unless --ask is given; /reset clears the history, "
                                        "/exit leaves.")
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of a chat, shared by `sage chat` and `sage finetune chat`."""
    add_serving_options(parser, Settings.from_env())
    add_chat_options(parser)
    parser.add_argument("--ask", metavar="QUESTION", help="ask one question, print the answer, clean up, exit")


def run(args: argparse.Namespace, settings: Settings) -> int:
    progress = TerminalProgress()
    manager = Manager(settings)
    try:
        endpoint = open_endpoint(manager, args, progress=progress).endpoint
        progress.close()
        from ..client import ChatClient

        conversation = Conversation(ChatClient(endpoint), settings, system_prompt=args.system)
        if args.ask is not None:
            show(conversation.ask(args.ask, **ask_options(args), on_delta=_write), args)
            return 0
        return interactive(conversation, args, endpoint.model)
    finally:
        manager.close(wait=True)  # a one-shot --ask must not leave its server behind when it returns


def ask_options(args: argparse.Namespace) -> dict:
    return dict(index=args.index, top_k=args.top_k, mode=args.mode, max_tokens=args.max_tokens,
                temperature=args.temperature)


def interactive(conversation: Conversation, args: argparse.Namespace, model: str) -> int:
    print(f"Chatting with {model}. /reset clears the history, /exit leaves.", file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            conversation.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            show(conversation.ask(line, **ask_options(args), on_delta=_write), args)
        except SageError as error:
            print(f"sage: {error}", file=sys.stderr)


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
    s = answer.stream
    figures = [f"{s.completion_tokens} tokens" if s.completion_tokens is not None else None,
               f"first token {s.time_to_first_token * 1000:.0f} ms" if s.time_to_first_token is not None else None,
               f"{s.tokens_per_second:.1f} tok/s" if s.tokens_per_second else None]
    print("(" + ", ".join(f for f in figures if f) + ")", file=sys.stderr)
