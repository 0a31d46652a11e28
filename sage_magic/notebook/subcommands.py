"""``%sage SUBCOMMAND``: status, stop, logs, models, indexes, history, reset, export, help (``error`` streams
an answer, so magics.py runs it with this module's :func:`error_prompt`), and the CLI
commands that run as ``sage ...`` in a child process (building an index or merging weights loads torch, which
must stay out of the kernel). Each takes the calling magics as a :class:`~.context.CellContext`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ..core.errors import SageError
from .display import publish
from .parsing import LINE_HELP, OptionError, cell_parser

if TYPE_CHECKING:
    from .context import CellContext


def status(magics: CellContext, args: argparse.Namespace) -> None:
    """The servers as a table; a base server's long adapter list is folded in it, and listed whole under it:
    collapsible in HTML, as text with ``--all`` (as `sage ps --all`)."""
    from ..faces.text import FOLDED_HINT, SERVER_HEADERS, adapter_lists, folded_adapters, server_rows
    from . import render

    statuses = magics.session.servers()
    if args.json:
        return publish(magics.shell, {"application/json": [s.as_dict() for s in statuses],
                              "text/plain": json.dumps([s.as_dict() for s in statuses], indent=2)})
    bundle = render.table(server_rows(statuses), SERVER_HEADERS, "No model servers are running.")
    folded = folded_adapters(statuses)
    if folded:
        bundle["text/plain"] += f"\n\n{adapter_lists(statuses)}" if args.all else f"\n({FOLDED_HINT})"
        bundle[render.MIME] += "".join(render.details(title, ", ".join(names)) for title, names in folded)
    publish(magics.shell, bundle)


def stop(magics: CellContext, args: argparse.Namespace) -> None:
    stopped, spared = magics.session.stop(args.id, everything=args.all)
    for record in stopped:
        print(f"stopped {record.id} ({record.served_name}, port {record.port})")
    for server in spared:
        print(f"left {server} running: it was running before this session (`%sage stop {server}` stops it)")
    if not stopped and not spared:
        print("No model servers to stop." if args.all or args.id else
              "This session started no server (`%sage stop --all` stops every one).")

def logs(magics: CellContext, args: argparse.Namespace) -> None:
    print(magics.session.logs(args.id, args.lines))

def finetune(magics: CellContext, args: argparse.Namespace) -> None:
    from . import render

    if args.finetune_command == "chat":
        raise OptionError("In a notebook, chat with `%%sage --finetune-model NAME` or `%sage_chat`.")
    if args.finetune_command != "list":
        return child(magics, args.argv)
    entries = magics.session.finetunes()
    if args.json:
        return publish(magics.shell, {"application/json": [e.as_dict() for e in entries],
                              "text/plain": json.dumps([e.as_dict() for e in entries], indent=2)})
    rows = [(e.name, e.base or "?", e.finetune.rank if e.finetune else "?",
             "yes" if e.finetune and e.finetune.is_merged else "no", e.problem or "ok") for e in entries]
    publish(magics.shell, render.table(rows, ("NAME", "BASE", "RANK", "MERGED", "STATUS"),
                               f"No fine-tunes under {magics.session.settings.finetune_root}. "
                               "`%sage finetune demo` builds two to try."))

def index(magics: CellContext, args: argparse.Namespace) -> None:
    from . import render

    if args.index_command != "list":
        return child(magics, args.argv)
    infos = magics.session.indexes()
    if args.json:
        from dataclasses import asdict

        return publish(magics.shell, {"application/json": [asdict(i) for i in infos],
                              "text/plain": json.dumps([asdict(i) for i in infos], indent=2)})
    rows = [(i.name, i.store, i.files, i.chunks, i.embedder, i.search, i.updated) for i in infos]
    publish(magics.shell, render.table(rows, ("NAME", "STORE", "FILES", "CHUNKS", "EMBEDDER", "SEARCH", "UPDATED"),
                               "No indexes yet. `%sage index add NAME PATH...` builds one."))

def child(magics: CellContext, argv: list[str]) -> None:
    """Run a heavy CLI command (index build, merge) as `sage ...` in a child: torch stays out of the kernel."""
    import subprocess

    settings = magics.session.settings
    env = {**os.environ, "SAGE_HOME": str(settings.home), "SAGE_RUNTIME_DIR": str(settings.runtime_dir)}
    process = subprocess.Popen([sys.executable, "-m", "sage_magic.cli.main", *argv], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    last = ""
    try:
        assert process.stdout is not None
        for out in process.stdout:
            print(out, end="", flush=True)
            last = out.strip() or last
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
    finally:  # even a failed or interrupted build may have changed what is on disk
        magics.session.catalog_changed("indexes" if argv[:1] == ["index"] else "finetunes")
    if process.returncode != 0:
        raise SageError(last.removeprefix("sage: ") or f"`sage {' '.join(argv)}` failed ({process.returncode}).")

def rate(magics: CellContext, args: argparse.Namespace) -> None:
    session = magics.session
    reply = session.reply(args.number)
    session.mark(reply, rating=args.rating)
    print(f"Marked {_which(session, reply)} {args.rating} (`%sage feedback` lists the marks).")


def correct(magics: CellContext, args: argparse.Namespace) -> Any:
    """With --text, store it; else show the answer in an editor under the cell (the panel's own bar)."""
    session = magics.session
    reply = session.reply(args.number)
    if args.text is not None:
        session.mark(reply, correction=args.text)
        print(f"Correction of {_which(session, reply)} saved (`%sage feedback` lists the marks).")
        return None
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        raise SageError("The correction editor needs ipywidgets (the notebook extra). Without it, give the text: "
                        "%sage correct N --text '...', or in Python: answer.correct('...').") from None
    from .marking import MarkBar

    bar = MarkBar()
    bar.attach(session, reply)
    bar.open_editor()
    return bar.box


def _which(session: Any, reply: Any) -> str:
    return f"answer {session.replies.index(reply) + 1} ({reply.model})"


def feedback(magics: CellContext, args: argparse.Namespace) -> Any:
    """`%sage feedback [NAME]`: the marked answers, as a table and (-o) a DataFrame; export and rm as `sage`."""
    from ..cli.feedback import run_export, run_rm

    settings = magics.session.settings
    if args.feedback_command != "list":
        return {"export": run_export, "rm": run_rm}[args.feedback_command](args, settings)
    from ..faces.text import FEEDBACK_HEADERS, feedback_summary
    from ..feedback.data import feedback_frame, feedback_rows
    from ..feedback.store import FeedbackStore
    from . import render

    rows = feedback_rows(FeedbackStore(settings.home), args.name, args.only)
    if args.output:
        magics.shell.user_ns[args.output] = feedback_frame(rows)
    if args.json:
        return publish(magics.shell, {"application/json": rows, "text/plain": json.dumps(rows, indent=2)})
    publish(magics.shell, render.table(feedback_summary(rows), FEEDBACK_HEADERS,
                                       "No marked answers yet: rate or correct an answer (`%sage rate bad`, "
                                       "`%sage correct`, or the chat panel's 👍 👎 Correct)."))


def history(magics: CellContext, _: argparse.Namespace) -> None:
    from . import render

    rows = [(m["role"], m["content"]) for m in magics.session.history]
    publish(magics.shell, render.table(rows, ("ROLE", "TEXT"), "The conversation is empty."))

def reset(magics: CellContext, _: argparse.Namespace) -> None:
    magics.session.reset()
    print("Conversation forgotten; servers keep running (`%sage stop` stops them).")

def export(magics: CellContext, args: argparse.Namespace) -> None:
    path = magics.session.export(args.path)
    print(f"Transcript of {len(magics.session.transcript)} answer(s) written to {path}")

def error_prompt(shell: Any) -> str | None:
    """What `%sage error` asks: the last failed cell as it was typed and its error (``Err[n]``), each cut as
    ``{Err[n]}`` is; None when no cell has failed since the extension was loaded."""
    from .interpolate import interpolate

    errors = shell.user_ns.get("Err") or {}
    if not errors:
        return None
    n = max(errors)
    raw = shell.history_manager.input_hist_raw
    cell = raw[n].strip() if 0 < n < len(raw) else ""
    source = f"The cell (In[{n}]):\n```python\n{{cell}}\n```\n\n" if cell else ""
    return interpolate(f"Explain this error from my notebook and how to fix it.\n\n{source}"
                       f"The error:\n```\n{{Err[{n}]}}\n```", {"cell": cell, "Err": errors})


def help(magics: CellContext, *_: Any) -> None:
    print(cell_parser(magics.session.settings).format_help())
    print(LINE_HELP)
