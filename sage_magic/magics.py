"""The IPython face: ``%%sage`` (the cell is the prompt), ``%sage SUBCOMMAND`` and ``%sage_chat``.

Thin on purpose: options come from options.py (the flags of ``sage chat``), the work from
:class:`sage_magic.session.Session`, the HTML from render.py. What lives here is IPython glue: parsing a
line into options with :class:`UsageError` for mistakes, one display updated in place while an answer
streams, ``-o``/``-f code`` effects on the namespace and the next cell, and showing a :class:`SageError`
as its one paragraph (a custom handler limited to SageError, so other exceptions keep IPython's handling).

Importing this module is cheap: the session, the engine, markdown and HTTP load at the first magic call.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from traitlets import Bool, Float, Int, Unicode, observe

from .errors import SageError

if TYPE_CHECKING:
    from .progress import Progress
    from .session import Reply, Session

FORMATS = ("markdown", "md", "text", "code", "json", "html", "math")  # render.FORMATS, kept import-free here
#: `%sage` subcommands answered in the kernel, and CLI commands run as `sage ...` in a child process (they
#: build indexes or merge weights: torch must stay out of the kernel).
SUBCOMMANDS = ("status", "stop", "logs", "models", "indexes", "history", "reset", "export", "help")
CHILD_COMMANDS = ("index", "finetune")
#: The fine-tune loop (loop_face.py): training in the kernel's background thread over a child process, and eval.
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
  help                     this text
  finetune train NAME --base BASE --data DATAFRAME [--background] [training options]
                           train a LoRA from a DataFrame (prompt/response or messages columns) in a child
                           process, with a progress bar and a live loss curve; interrupt to stop cleanly
  finetune watch [NAME]    show a --background training's progress in this cell
  finetune stop [NAME]     stop a training of this kernel cleanly (its last checkpoint stays usable)
  eval DATAFRAME --models A,B,base [--metric M] [-o VAR] [--diff]
                           every prompt to every model, concurrently; summary table and bar chart
  index add|update|show|rm|query ... and finetune demo|merge ...: run as `sage ...` in a child process,
                           so building an index or merging weights never loads torch into the kernel.
%sage_chat [options]       a chat widget on the same session: same options as %%sage, shared history.
Defaults: %config SageMagics.<name> = value (`%config SageMagics` lists them)."""
_ALIASES = {"status": ["ps"], "models": ["finetune", "list"], "indexes": ["index", "list"]}


class OptionError(UsageError):
    """A mistake in a magic's options. Unlike a plain UsageError (printed to stderr, which nbval does not count
    as a failure) it is shown as the cell's error output by :func:`_show_error`, so every notebook runner sees
    the failed cell."""


class _HelpRequested(Exception):
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
        raise _HelpRequested

    def print_help(self, file: Any = None) -> None:
        print(self.format_help(), file=file or sys.stdout)


def split(line: str) -> list[str]:
    """The magic's words, with ``--vllm-arg --flag`` joined the way the CLI joins them (options.py)."""
    from .options import join_option_values

    try:
        return join_option_values(shlex.split(line))
    except ValueError as error:
        raise OptionError(f"Cannot read the options {line!r}: {error} (quote values with spaces).") from None


def cell_parser(settings: Any = None) -> MagicParser:
    """The flags of ``sage chat`` plus the notebook-only ones."""
    from .session import option_parser

    parser = option_parser(settings, MagicParser)
    parser.prog = "%%sage"
    group = parser.add_argument_group("notebook")
    group.add_argument("-f", "--format", choices=FORMATS, default=None,
                       help="how to render the answer (default: %%config SageMagics.default_format, markdown); "
                            "code also inserts the code as the next cell")
    group.add_argument("-o", "--output", metavar="VAR", type=_identifier,
                       help="store the answer in VAR: a str carrying .model, .citations, .metrics")
    group.add_argument("--compare", metavar="A,B,base",
                       help="stream the prompt to several fine-tunes of one base (base = the base model) side "
                            "by side")
    group.add_argument("--new-chat", action="store_true", help="forget the conversation before this cell")
    group.add_argument("--no-interpolate", action="store_true",
                       help="send {var}, {In[n]}, {Out[n]}, {Err[n]} as written instead of filling them in")
    group.add_argument("-h", "--help", action="store_true", help="show this help")
    return parser


def _identifier(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


def line_parser() -> MagicParser:
    """``%sage SUBCOMMAND``: the CLI's own parsers for ps/stop/logs/finetune/index, plus the session's."""
    from .cli import finetune, index, servers

    parser = MagicParser(prog="%sage", add_help=False)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=MagicParser)
    for module in (servers, finetune, index):
        module.register(sub)
    sub.choices["stop"]._mutually_exclusive_groups[0].required = False  # bare `%sage stop`: what we started
    for action in sub.choices["logs"]._actions:
        if action.dest == "id":  # in a notebook the server of this session is the natural default
            action.nargs, action.required, action.default = "?", False, None
    sub.add_parser("history", help="the conversation so far")
    sub.add_parser("reset", help="forget the conversation (servers keep running)")
    export = sub.add_parser("export", help="write the transcript with citations and figures (.md or .json)")
    export.add_argument("path")
    sub.add_parser("help", help="the options of %%%%sage and the %%sage subcommands")
    return parser


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

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._session: Session | None = None
        self._parser: tuple[tuple, MagicParser] | None = None
        self.training: dict[str, Any] = {}  # fine-tune name -> loop_face.TrainRun of this kernel

    # --- the session -----------------------------------------------------------------------------------------

    @property
    def session(self) -> "Session":
        """This kernel's session (created on first use, so `%load_ext` stays fast)."""
        if self._session is None:
            from .session import Session

            self._session = Session()
            self._configure()
        return self._session

    @observe("max_history", "system_prompt", "keep_alive")
    def _changed(self, _: Any) -> None:
        if self._session is not None:
            self._configure()

    def _configure(self) -> None:
        from .config import parse_duration

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
            run.done.wait()
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
        except _HelpRequested:
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
    def sage(self, line: str, cell: str) -> None:
        """Ask the model the cell's text. `%sage help` lists the options."""
        args = self.parse(line)
        if args is None:
            return
        prompt = cell.strip()
        if self.interpolate and not args.no_interpolate:
            from .interpolate import interpolate

            prompt = interpolate(prompt, self.shell.user_ns)
        if not prompt.strip():
            raise OptionError("The cell is empty: write the question on the lines below %%sage.")
        if args.compare:
            return self._compare(prompt, args)
        live = LiveOutput(self.shell, self.update_interval)
        try:
            reply = self.session.ask(prompt, args, on_delta=live.delta, on_progress=live.progress,
                                     new_chat=args.new_chat)
        except KeyboardInterrupt:
            live.stopped()
            raise
        self._show(reply, args, live)

    def _show(self, reply: "Reply", args: argparse.Namespace, live: "LiveOutput") -> None:
        from . import render

        bundle, metadata = render.answer(reply, args.format)
        live.show(bundle, metadata)
        if render.MIME not in bundle:
            live.extra(render.footer(reply))
        if args.format == "code" and reply.strip():
            self.shell.set_next_input(render.extract_code(reply), replace=False)
        if args.output:
            self.shell.user_ns[args.output] = reply

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
        the fine-tune loop (%sage finetune train|watch|stop, %sage eval: loop_face.py)."""
        tokens = split(line)
        if not tokens or tokens[0] in ("help", "-h", "--help"):
            return self._help()
        loop = LOOP_COMMANDS.get(tuple(tokens[:2])) or LOOP_COMMANDS.get(tuple(tokens[:1]))
        if loop is not None:
            return self._loop(loop, tokens[2 if tokens[0] == "finetune" else 1:])
        if tokens[0] not in SUBCOMMANDS + CHILD_COMMANDS + ("ps",):
            raise OptionError(f"%sage has no subcommand {tokens[0]!r}. Use one of: {', '.join(SUBCOMMANDS)}, or "
                             "`sage index ...` / `sage finetune ...` commands; to ask a question use %%sage.")
        try:
            argv = _ALIASES.get(tokens[0], tokens[:1]) + tokens[1:]
            args = line_parser().parse_args(argv)
        except _HelpRequested:
            return None
        args.argv = argv
        return getattr(self, "_" + args.command.replace("-", "_"))(args)

    def _loop(self, command: str, argv: list[str]) -> Any:
        """%sage finetune train|watch|stop and %sage eval: see loop_face.py."""
        from . import loop_face

        parser = {"train": loop_face.train_parser, "eval": loop_face.eval_parser}.get(command)
        try:
            args = (parser() if parser else loop_face.name_parser(f"%sage finetune {command}")).parse_args(argv)
        except _HelpRequested:
            return None
        return getattr(loop_face, f"{command}_cell")(self, args)

    def _publish(self, bundle: dict[str, Any], metadata: dict | None = None) -> None:
        self.shell.display_pub.publish(data=bundle, metadata=metadata or {})

    def _ps(self, args: argparse.Namespace) -> None:
        from . import render
        from .cli.servers import _duration, _until

        statuses = self.session.servers()
        if args.json:
            return self._publish({"application/json": [s.as_dict() for s in statuses],
                                  "text/plain": json.dumps([s.as_dict() for s in statuses], indent=2)})
        rows = [(s.record.id, s.record.served_name, s.record.kind, ",".join(sorted(s.record.adapters)) or "-",
                 s.record.port, s.record.pid or "-", s.alive_owners, _duration(s.uptime),
                 f"{s.memory_bytes / 2**30:.1f} GiB", s.record.state, _until(s.record.keep_alive, s.record.idle_until))
                for s in statuses]
        self._publish(render.table(rows, ("ID", "NAME", "MODE", "ADAPTERS", "PORT", "PID", "OWNERS", "UP", "MEMORY",
                                          "STATE", "UNTIL"), "No model servers are running."))

    def _stop(self, args: argparse.Namespace) -> None:
        stopped, spared = self.session.stop(args.id, everything=args.all)
        for record in stopped:
            print(f"stopped {record.id} ({record.served_name}, port {record.port})")
        for server in spared:
            print(f"left {server} running: it was running before this session (`%sage stop {server}` stops it)")
        if not stopped and not spared:
            print("No model servers to stop." if args.all or args.id else
                  "This session started no server (`%sage stop --all` stops every one).")

    def _logs(self, args: argparse.Namespace) -> None:
        print(self.session.logs(args.id, args.lines))

    def _finetune(self, args: argparse.Namespace) -> None:
        from . import render

        if args.finetune_command == "chat":
            raise OptionError("In a notebook, chat with `%%sage --finetune-model NAME` or `%sage_chat`.")
        if args.finetune_command != "list":
            return self._child(args.argv)
        entries = self.session.finetunes()
        if args.json:
            return self._publish({"application/json": [e.as_dict() for e in entries],
                                  "text/plain": json.dumps([e.as_dict() for e in entries], indent=2)})
        rows = [(e.name, e.finetune.base_ref if e.finetune else "?", e.finetune.rank if e.finetune else "?",
                 "yes" if e.finetune and e.finetune.is_merged else "no", e.problem or "ok") for e in entries]
        self._publish(render.table(rows, ("NAME", "BASE", "RANK", "MERGED", "STATUS"),
                                   f"No fine-tunes under {self.session.settings.finetune_root}. "
                                   "`%sage finetune demo` builds two to try."))

    def _index(self, args: argparse.Namespace) -> None:
        from . import render

        if args.index_command != "list":
            return self._child(args.argv)
        infos = self.session.indexes()
        if args.json:
            from dataclasses import asdict

            return self._publish({"application/json": [asdict(i) for i in infos],
                                  "text/plain": json.dumps([asdict(i) for i in infos], indent=2)})
        rows = [(i.name, i.files, i.chunks, i.embedder, i.search, i.updated) for i in infos]
        self._publish(render.table(rows, ("NAME", "FILES", "CHUNKS", "EMBEDDER", "SEARCH", "UPDATED"),
                                   "No indexes yet. `%sage index add NAME PATH...` builds one."))

    def _child(self, argv: list[str]) -> None:
        """Run a heavy CLI command (index build, merge) as `sage ...` in a child: torch stays out of the kernel."""
        import subprocess

        settings = self.session.settings
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
        if process.returncode != 0:
            raise SageError(last.removeprefix("sage: ") or f"`sage {' '.join(argv)}` failed ({process.returncode}).")

    def _history(self, _: argparse.Namespace) -> None:
        from . import render

        rows = [(m["role"], m["content"]) for m in self.session.history]
        self._publish(render.table(rows, ("ROLE", "TEXT"), "The conversation is empty."))

    def _reset(self, _: argparse.Namespace) -> None:
        self.session.reset()
        print("Conversation forgotten; servers keep running (`%sage stop` stops them).")

    def _export(self, args: argparse.Namespace) -> None:
        path = self.session.export(args.path)
        print(f"Transcript of {len(self.session.transcript)} answer(s) written to {path}")

    def _help(self, *_: Any) -> None:
        print(cell_parser(self.session.settings).format_help())
        print(LINE_HELP)

    # --- %sage_chat --------------------------------------------------------------------------------------------

    @line_magic("sage_chat")
    def sage_chat(self, line: str) -> Any:
        """A chat widget on this kernel's session; the backend starts here, with visible progress."""
        args = self.parse(line)
        if args is None:
            return None
        live = LiveOutput(self.shell, self.update_interval)
        lease = self.session.lease(args, progress=live.progress)
        from .widget import GONE, ChatWidget

        chatting = f"Chatting with {lease.endpoint.model}."
        live.show({"text/plain": chatting, "text/html": f"<div>{html.escape(chatting)}</div>{GONE}"})
        self.session.max_model_len(lease.endpoint)  # warms the client now, not on the panel's first question

        return ChatWidget(self.session, args)


class LiveOutput:
    """One display in the cell, updated in place: progress, then the streaming text, then the answer.

    Updates are throttled to ``interval`` seconds, so a fast stream costs a few dozen display messages,
    not one per token. It publishes through the shell's own display publisher (works in any shell, not only
    the singleton one ``IPython.display`` assumes).
    """

    def __init__(self, shell: Any, interval: float) -> None:
        self.publisher = shell.display_pub
        self.interval = interval
        import uuid

        self.display_id = uuid.uuid4().hex
        self.shown = False
        self.updates = 0
        self.parts: list[str] = []
        self.started = time.monotonic()
        self._last = 0.0
        self._phase = ""

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True

    def show(self, bundle: dict[str, Any], metadata: dict | None = None) -> None:
        self.publisher.publish(data=bundle, metadata=metadata or {}, transient={"display_id": self.display_id},
                               update=self.shown)
        self.shown = True
        self.updates += 1

    def extra(self, bundle: dict[str, Any]) -> None:
        self.publisher.publish(data=bundle, metadata={})

    def progress(self, event: "Progress") -> None:
        from . import render

        if event.phase != self._phase or self.due():
            self._phase = event.phase
            self.show(render.progress(event, time.monotonic() - self.started))

    def delta(self, text: str) -> None:
        from . import render

        self.parts.append(text)
        if self.due():
            self.show(render.streaming("".join(self.parts)))

    def stopped(self) -> None:
        """After a kernel interrupt: keep what streamed, marked as stopped."""
        from . import render

        text = "".join(self.parts)
        self.show({"text/plain": text + " [stopped]",
                   render.MIME: render.pre(text) + "<p><strong>(stopped: partial answer)</strong></p>"})


_PREVIOUS_HANDLER = "_sage_previous_custom_exc"
HANDLED = (SageError, OptionError)  # the only exceptions whose display the extension takes over


def _show_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
    """A SageError or OptionError in a cell: its one paragraph as the cell's error output (no traceback)."""
    shown = UsageError if issubclass(etype, OptionError) else etype
    text = value.brief() if isinstance(value, SageError) else str(value)
    stb = [f"\x1b[0;31m{shown.__name__}\x1b[0m: {text}"]
    shell._showtraceback(shown, value, stb)  # ipykernel sends it as the cell's error: nbclient/nbval see it
    return stb


def register(shell: Any) -> SageMagics:
    """Register the magics, the SageError handler and the Err[n] recorder on ``shell``."""
    from .interpolate import record_error

    magics = SageMagics(shell=shell, parent=shell)
    shell.register_magics(magics)
    shell.configurables.append(magics)
    setattr(shell, _PREVIOUS_HANDLER, (shell.custom_exceptions, getattr(shell, "CustomTB", None)))
    shell.set_custom_exc(HANDLED, _show_error)
    shell.user_ns.setdefault("Err", {})

    def record(result: Any) -> None:
        record_error(shell.user_ns, result.execution_count, result.error_in_exec)

    magics._record = record  # type: ignore[attr-defined]
    shell.events.register("post_run_cell", record)
    return magics


def unregister(shell: Any) -> None:
    """Undo :func:`register`: magics, handler, hook; leave the session's servers (they follow keep-alive)."""
    magics = shell.magics_manager.registry.pop("SageMagics", None)
    for kind, name in (("cell", "sage"), ("line", "sage"), ("line", "sage_chat")):
        shell.magics_manager.magics[kind].pop(name, None)
    if magics is None:
        return
    if magics in shell.configurables:
        shell.configurables.remove(magics)
    exceptions, handler = getattr(shell, _PREVIOUS_HANDLER, ((), None))
    if shell.custom_exceptions == HANDLED:
        shell.custom_exceptions = exceptions
        if handler is not None:
            shell.CustomTB = handler
    try:
        shell.events.unregister("post_run_cell", magics._record)
    except ValueError:
        pass
    magics.close()

