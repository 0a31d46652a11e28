"""The IPython face: ``%%sage`` (the cell is the prompt), ``%sage SUBCOMMAND`` and ``%sage_chat``.

Thin on purpose: options come from faces/options.py (the flags of ``sage chat``), the work from
:class:`sage_magic.chat.session.Session`, the HTML from render.py. What lives here is IPython glue: reading a
line into options with :class:`UsageError` for mistakes, one display updated in place while an answer
streams, and ``-o``/``-f code`` effects on the namespace and the next cell. A :class:`SageError` shows as its
one paragraph by itself (its ``_render_traceback_``), so other exceptions keep IPython's handling.

Importing this module is cheap: the session, the engine, markdown and HTTP load at the first magic call.
"""

from __future__ import annotations

import argparse
import html
import os
import shlex
import threading
from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from traitlets import Bool, Float, Int, List, Unicode, observe

from ..core.errors import SageError
from .display import LiveOutput, publish
from .parsing import (
    _ALIASES,
    CHILD_COMMANDS,
    FEEDBACK_ACTIONS,
    FORMATS,
    LOOP_COMMANDS,
    SUBCOMMANDS,
    HelpRequested,
    MagicParser,
    OptionError,
    cell_parser,
    line_parser,
    split,
)

if TYPE_CHECKING:
    from ..chat.reply import Reply
    from ..chat.session import Session


@magics_class
class SageMagics(Magics):
    """``%%sage``, ``%sage`` and ``%sage_chat``. Configure with ``%config SageMagics.<name> = value``."""

    default_backend = Unicode(None, allow_none=True,
                              help="--backend when a cell gives none (default: SAGE_DEBUG_BACKEND, else finetune)"
                              ).tag(config=True)
    default_finetune_model = Unicode(None, allow_none=True,
                                     help="--finetune-model when a cell gives none (default: "
                                          "SAGE_DEBUG_FINETUNE_MODEL)").tag(config=True)
    default_format = Unicode("markdown", help=f"-f when a cell gives none: one of {', '.join(FORMATS)}"
                             ).tag(config=True)
    default_index = Unicode(None, allow_none=True, help="--index when a cell gives none (default: no grounding)"
                            ).tag(config=True)
    max_history = Int(20, allow_none=True, help="exchanges re-sent to the model (None: all that fit; 0: none)"
                      ).tag(config=True)
    keep_alive = Unicode(None, allow_none=True,
                         help="--keep-alive when a cell gives none: 0, 30s, 5m, 1h, -1 (default SAGE_KEEP_ALIVE)"
                         ).tag(config=True)
    system_prompt = Unicode(None, allow_none=True, help="system prompt when a cell gives no --system"
                            ).tag(config=True)
    max_tokens = Int(256, help="--max-tokens when a cell gives none").tag(config=True)
    interpolate = Bool(True, help="fill in {var}, {In[n]}, {Out[n]}, {Err[n]} (a cell can say --no-interpolate)"
                       ).tag(config=True)
    update_interval = Float(0.1, help="seconds between display updates while an answer streams").tag(config=True)
    prewarm = List(Unicode(), help="fine-tunes to start (or reuse) in the background when the extension loads, "
                                   "so the first question finds them ready (default: SAGE_PREWARM, "
                                   "comma-separated)").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._session: Session | None = None
        self._session_lock = threading.Lock()  # a prewarm thread and the first cell may both ask for it
        self._parser: tuple[tuple, MagicParser] | None = None
        self.training: dict[str, Any] = {}  # fine-tune name -> finetune_cells.TrainRun of this kernel
        self._drawn: Reply | None = None  # the answer a cell just drew and returns: IPython must not draw it again
        self._panels: dict[object, Any] = {}  # the cell that showed it (or a token) -> its %sage_chat panel

    # --- the session -----------------------------------------------------------------------------------------

    @property
    def session(self) -> "Session":
        """This kernel's session (created on first use, so `%load_ext` stays fast)."""
        with self._session_lock:
            if self._session is None:
                from ..chat.session import Session

                self._session = Session()
                self._configure()
            return self._session

    def start_prewarm(self, names: list[str] | None = None) -> None:
        """Start or reuse the servers of ``names`` (default: ``prewarm``, else SAGE_PREWARM) in the background.
        The whole of it runs on a thread: even creating the session imports the chat engine, which
        `%load_ext` must not wait for. Progress shows in `%sage status` and the sidebar (the registry); a
        failure is raised by the first question to that model."""
        if names is None and not self.prewarm and not os.environ.get("SAGE_PREWARM"):
            return
        threading.Thread(target=self._prewarm, args=(names,), daemon=True, name="sage-prewarm").start()

    def _prewarm(self, names: list[str] | None) -> None:
        session = self.session
        names = names or list(self.prewarm) or list(session.settings.prewarm)
        options = [self.parse(f"--finetune-model {shlex.quote(name)}") for name in names]
        session.prewarm([args for args in options if args is not None])

    @observe("prewarm")
    def _prewarm_changed(self, change: Any) -> None:
        added = [name for name in change["new"] if name not in change["old"]]
        if added:
            self.start_prewarm(added)

    @observe("max_history", "system_prompt", "keep_alive")
    def _changed(self, _: Any) -> None:
        if self._session is not None:
            self._configure()

    def _configure(self) -> None:
        from ..core.config import parse_duration

        session = self._session
        assert session is not None
        session.max_history = self.max_history
        session.system_prompt = self.system_prompt
        try:
            session.keep_alive = None if self.keep_alive is None else parse_duration(self.keep_alive)
        except SageError as error:
            raise OptionError(f"SageMagics.keep_alive: {error}") from None

    def close(self) -> None:
        for run in self.training.values():  # a training child never outlives the magics that started it
            run.cancel.set()
        for run in self.training.values():
            run.wait()
        for panel in self._panels.values():
            panel.close()
        self._panels.clear()
        if self._session is not None:
            self._session.close()
            self._session = None

    # --- parsing ---------------------------------------------------------------------------------------------

    def parse(self, line: str) -> argparse.Namespace | None:
        """Options of one ``%%sage`` line (None after -h); mistakes raise UsageError with the option's help."""
        defaults: dict[str, Any] = {"max_tokens": self.max_tokens, "format": None}
        if self.default_backend:
            defaults["backend"] = self.default_backend
        if self.default_finetune_model:
            defaults["finetune_model"] = self.default_finetune_model
        key = tuple(sorted(defaults.items()))
        if self._parser is None or self._parser[0] != key:  # building it costs a few ms per cell: keep it
            self._parser = (key, cell_parser(self.session.settings))
            self._parser[1].set_defaults(**defaults)
        parser = self._parser[1]
        try:
            args = parser.parse_args(split(line))
        except HelpRequested:
            args = argparse.Namespace(help=True)
        if args.help:
            parser.print_help()
            return None
        if args.format is None:
            args.format = self.default_format if self.default_format in FORMATS else "markdown"
        if args.index is None and self.default_index:
            args.index = self.default_index
        for chunk in args.vllm_arg:
            split(chunk)
        return args

    # --- %%sage ------------------------------------------------------------------------------------------------

    @cell_magic("sage")
    def sage(self, line: str, cell: str) -> "Reply | None":
        """Ask the model the cell's text. `%sage help` lists the options. The answer is the cell's value."""
        args = self.parse(line)
        if args is None:
            return None
        prompt = cell.strip()
        if self.interpolate and not args.no_interpolate:
            from .interpolate import interpolate

            prompt = interpolate(prompt, self.shell.user_ns)
        if not prompt.strip():
            raise OptionError("The cell is empty: write the question on the lines below %%sage.")
        return self._run(prompt, args)

    def _run(self, prompt: str, args: argparse.Namespace) -> "Reply | None":
        """Stream the answer to ``prompt`` into one display and return it (``--compare``: the answers side by
        side, returning None: a dict of replies would be drawn again as text). `%%sage` and `%sage error`."""
        if args.compare:
            self._compare(prompt, args)
            return None
        live = LiveOutput(self.shell, self.update_interval)
        try:
            reply = self.session.ask(prompt, args, on_delta=live.delta, on_progress=live.progress,
                                     new_chat=args.new_chat)
        except KeyboardInterrupt:
            live.stopped()
            raise
        self._draw(reply, args.format, live.show)
        if args.format == "code" and reply.strip():
            from .render import extract_code

            self.shell.set_next_input(extract_code(reply), replace=False)
        if args.output:
            self.shell.user_ns[args.output] = reply
        self._drawn = reply
        return reply

    def _draw(self, reply: "Reply", fmt: str, show: Any) -> None:
        """The finished answer through ``show(bundle, metadata)``; JSON and math get their footer apart."""
        from . import render

        bundle, metadata = render.answer(reply, fmt)
        show(bundle, metadata)
        if render.MIME not in bundle:
            publish(self.shell, render.footer(reply))

    def display_reply(self, reply: "Reply") -> None:
        """How IPython shows a Reply (registered by extension.py): the one a cell just drew and returned is
        only stored as ``Out[n]`` and ``_`` (its answer is on screen already); any other (``answer`` from
        ``-o``, ``Out[3]``) is drawn as an answer with its footer."""
        if reply is self._drawn:
            self._drawn = None
            return
        self._draw(reply, self.default_format if self.default_format in FORMATS else "markdown",
                   lambda bundle, metadata: publish(self.shell, bundle, metadata))

    def cell_finished(self) -> None:
        """After every cell: an answer that was not the cell's value (``x = %sage error``) is drawn normally."""
        self._drawn = None

    def _compare(self, prompt: str, args: argparse.Namespace) -> None:
        from . import render

        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        texts: dict[str, list[str]] = {n: [] for n in names}
        live = LiveOutput(self.shell, self.update_interval)

        def redraw(force: bool = False) -> None:
            if live.due() or force:
                live.show(render.compare(names, {n: "".join(t) for n, t in texts.items()}))

        try:
            replies = self.session.compare(prompt, names, args, on_delta=lambda n, d: texts[n].append(d),
                                           on_progress=live.progress, on_tick=redraw)
        except KeyboardInterrupt:
            redraw(force=True)
            raise
        live.show(render.compare(names, {}, replies, args.format),
                  {"sage": {"compare": [r.provenance() for r in replies]}})
        if args.output:
            self.shell.user_ns[args.output] = dict(zip(names, replies))

    # --- %sage SUBCOMMAND --------------------------------------------------------------------------------------

    @line_magic("sage")
    def sage_line(self, line: str) -> Any:
        """Manage servers and the chat (%sage status|stop|logs|models|indexes|history|reset|export|help) and run
        the fine-tune loop (%sage finetune train|watch|stop, %sage eval: finetune_cells.py, eval_cells.py)."""
        tokens = split(line)
        if not tokens or tokens[0] in ("help", "-h", "--help"):
            from .subcommands import help

            return help(self)
        if tokens[0] == "error":
            return self._explain_error(tokens[1:])
        loop = LOOP_COMMANDS.get(tuple(tokens[:2])) or LOOP_COMMANDS.get(tuple(tokens[:1]))
        if loop is not None:
            return self._loop(loop, tokens[2 if tokens[0] == "finetune" else 1:])
        if tokens[0] not in SUBCOMMANDS + CHILD_COMMANDS + ("ps",):
            raise OptionError(f"%sage has no subcommand {tokens[0]!r}. Use one of: {', '.join(SUBCOMMANDS)}, or "
                             "`sage index ...` / `sage finetune ...` commands; to ask a question use %%sage.")
        try:
            argv = _ALIASES.get(tokens[0], tokens[:1]) + tokens[1:]
            if argv[0] == "feedback" and (len(argv) < 2 or argv[1] not in FEEDBACK_ACTIONS):
                argv.insert(1, "list")  # `%sage feedback [NAME] [-o VAR]` shows them
            args = line_parser().parse_args(argv)
        except HelpRequested:
            return None
        args.argv = argv
        from . import subcommands

        handler = "status" if args.command == "ps" else args.command.replace("-", "_")
        return getattr(subcommands, handler)(self, args)

    def _explain_error(self, words: list[str]) -> "Reply | None":
        """`%sage error [options]`: the last failed cell and its error, asked and streamed like `%%sage`."""
        from .subcommands import error_prompt

        args = self.parse(shlex.join(words))
        if args is None:
            return None
        prompt = error_prompt(self.shell)
        if prompt is None:
            print("No cell has failed in this notebook yet: there is no error to explain.")
            return None
        return self._run(prompt, args)

    def _loop(self, command: str, argv: list[str]) -> Any:
        """%sage finetune train|watch|stop (finetune_cells.py) and %sage eval (eval_cells.py)."""
        from . import eval_cells, finetune_cells

        cells = eval_cells if command == "eval" else finetune_cells
        parser = {"train": finetune_cells.train_parser, "eval": eval_cells.eval_parser}.get(command)
        try:
            args = (parser() if parser else finetune_cells.name_parser(f"%sage finetune {command}")).parse_args(argv)
        except HelpRequested:
            return None
        return getattr(cells, f"{command}_cell")(self, args)

    # --- %sage_chat --------------------------------------------------------------------------------------------

    @line_magic("sage_chat")
    def sage_chat(self, line: str) -> Any:
        """A chat panel on this kernel's session, one per cell. With a model its backend starts here, with
        visible progress; with none, the panel offers a fine-tune picker and starts it on the first Send."""
        args = self.parse(line)
        if args is None:
            return None
        self._refuse_cell_only(line, args)
        from .panel import GONE, ChatWidget, require_widgets

        require_widgets()
        cell = self._cell()
        if cell in self._panels:  # re-run: the front end cleared the old panel; stop it drawing unseen tokens
            self._panels.pop(cell).close()
        live = LiveOutput(self.shell, self.update_interval)
        if args.backend == "finetune" and not args.finetune_model:
            live.show({"text/plain": "SAGE chat: pick a fine-tune in the panel.", "text/html": GONE})
        else:
            lease = self.session.lease(args, progress=live.progress)
            chatting = f"Chatting with {lease.endpoint.model}."
            live.show({"text/plain": chatting, "text/html": f"<div>{html.escape(chatting)}</div>{GONE}"})
            self.session.max_model_len(lease.endpoint)  # warms the client now, not on the panel's first question
        output, namespace = args.output, self.shell.user_ns
        panel = ChatWidget(self.session, args,
                           on_reply=(lambda reply: namespace.__setitem__(output, reply)) if output else None)
        if args.new_chat:
            panel.clear()
        self._panels[object() if cell is None else cell] = panel
        return panel

    def _cell(self) -> str | None:
        """The running cell: its id from the front end (JupyterLab sends one), else its text; None outside one."""
        result = getattr(self.shell.displayhook, "exec_result", None)
        info = getattr(result, "info", None)
        return (getattr(info, "cell_id", None) or getattr(info, "raw_cell", None)) if info is not None else None

    def _refuse_cell_only(self, line: str, args: argparse.Namespace) -> None:
        """The %%sage options a panel cannot honour, refused in one line each (-o and --new-chat it honours)."""
        if args.compare:
            raise OptionError("%sage_chat chats with one model at a time: compare fine-tunes in a "
                              "`%%sage --compare A,B` cell (open panels show that comparison too).")
        assert self._parser is not None  # parse() built it
        typed = self._parser[1].parse_args(split(line)).format  # -f as typed: parse() filled in the default
        if typed not in (None, "markdown", "md"):
            raise OptionError(f"%sage_chat shows every answer as Markdown: drop -f {typed} (-f is for %%sage "
                              "cells).")
