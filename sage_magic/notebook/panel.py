"""The ``%sage_chat`` panel: a chat on the kernel's :class:`~sage_magic.chat.session.Session`, as ipywidgets.

Parts: the message list, a multi-line input (Enter sends, Shift+Enter makes a new line), Send / Stop / Clear
/ Export, a fine-tune picker, index and top-k controls, and a status line with a progress bar while a server
starts. Every model or document text goes through render.py (Markdown with raw HTML off, then an allow-list
sanitizer), so nothing an answer or a retrieved passage says can run in the page.

Why the message list is drawn from session EVENTS and not from the panel's own asks: the panel and ``%%sage``
share one conversation, and several panels may sit in one notebook. Each panel subscribes to the session, so
a turn asked anywhere (this panel, another one, a ``%%sage`` cell) appears in all of them, streaming.

Asks run on ONE worker thread per panel, which lives as long as the panel, never on the kernel's main thread
(the buttons stay live while the model writes). Stop sets the answer's cancel event from the comm thread; the
partial answer stays, marked stopped.

A spare turn: a question and an answer widget (and the answer's 👍 👎 Correct bar, marking.py) made ahead,
hidden in the message list. Creating widgets is
the slow part of drawing a new turn in the browser (each HTML widget is three models, each opened with its
own message, before the list can show them), and it used to finish only when the first token did; a new turn
now takes the spare (a class change and a value) and the next spare is made once the answer is complete.

Enter-to-send: ipywidgets' Textarea has no key events, so the input is a tiny anywidget (:class:`PromptInput`,
a textarea and a dozen lines of ESM) that sends a ``submit`` message on Enter. Without anywidget the panel falls
back to a plain Textarea whose placeholder says so (Send button only); without ipywidgets there is no panel, and
:func:`require_widgets` says so before any server starts.

No model yet (the JupyterLab palette runs a bare ``%sage_chat``): the panel opens with the fine-tune picker
empty and starts or reuses the server on the first Send, showing the phases in its status line.

Closing a panel (``%sage_chat`` re-run in its cell, ``%unload_ext``) ends its subscription, cancels its answer,
lets its worker thread return and closes its widgets: a panel nobody sees must not draw every token again.
A server that thread started outlives it: its supervisor watches the kernel PROCESS (the stdin pipe and the
registry's owners); PR_SET_PDEATHSIG, which follows the forking thread, ties only vLLM to the supervisor.

Why the typed text travels in custom messages and not as synced state: the front end throttles state updates
(one in flight per model; later ones wait until the kernel is idle) but sends custom messages at once, so a
``submit`` sent after a ``save_changes()`` can reach the kernel BEFORE the last keystrokes (CI saw "about
tenso" asked for "about tensors."). Every keystroke and the submit are custom messages, delivered in the order
typed; the kernel records them without an echo, and clears the box with a ``sent`` message that removes only
the text it sent, so keys typed meanwhile survive.
"""

from __future__ import annotations

import argparse
import html
import queue
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..chat.events import Event
from ..chat.reply import Reply
from ..chat.session import Session
from ..core.errors import SageError
from .marking import MarkBar

#: What a re-opened notebook shows above a panel whose kernel stopped. JupyterLab draws a widget whose model
#: is gone as "Error displaying widget: model not found" and never falls back to the bundle's text/html, so
#: ``%sage_chat`` shows this note as an output of its own just before the panel, and a live panel hides it
#: (:data:`_HIDE_GONE`): the note is seen only when the panel below it is dead.
GONE = ("<div class='sage-chat-gone' style='border: 1px solid #c90; padding: 0.5em'><strong>SAGE chat:</strong> "
        "this chat panel belonged to a kernel that has stopped. Run <code>%sage_chat</code> again.</div>")
_HIDE_GONE = ("<style>.jp-OutputArea-child:has(+ .jp-OutputArea-child .sage-chat) .sage-chat-gone "
              "{ display: none; } .sage-chat .sage-spare { display: none; }</style>")

_ESM = """
function render({ model, el }) {
  const box = document.createElement("textarea");
  box.className = "sage-chat-input";
  box.rows = 3;
  box.placeholder = "Ask your model… (Enter sends, Shift+Enter: new line)";
  box.style.width = "100%";
  box.style.boxSizing = "border-box";
  box.value = model.get("value");
  const typed = () => model.send({ event: "input", text: box.value });
  box.addEventListener("input", typed);
  // Keys typed here are text, not notebook shortcuts (Shift+Enter would re-run the cell), as in ipywidgets' own
  // Textarea.
  box.addEventListener("keypress", (e) => e.stopPropagation());
  box.addEventListener("keydown", (e) => {
    e.stopPropagation();
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      model.send({ event: "submit", text: box.value });
    }
  });
  // The kernel took `text`: drop it from the front of the box, keeping whatever was typed since.
  model.on("msg:custom", (msg) => {
    if (msg.event === "sent" && box.value.startsWith(msg.text)) {
      box.value = box.value.slice(msg.text.length);
      typed();
    }
  });
  // A value set from Python (the kernel never echoes the browser's own keystrokes back).
  model.on("change:value", () => { box.value = model.get("value"); });
  el.appendChild(box);
}
export default { render };
"""


def require_widgets() -> None:
    """A clear error, before any server starts, when the panel cannot be drawn because ipywidgets is missing."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        raise SageError("%sage_chat needs ipywidgets: install the notebook extra (pip install 'sage-magic[notebook]', "
                        "or pip install ipywidgets anywidget) and restart the kernel. %%sage cells work without "
                        "it.") from None


#: The fallback input's placeholder: Enter cannot send there, and the reader should know why.
NO_ANYWIDGET = "Ask your model… (anywidget is not installed: Enter makes a new line, Send asks)"


def _prompt_input() -> Any:
    """A multi-line input whose Enter sends: the anywidget when installed, else a plain Textarea."""
    import ipywidgets as widgets

    try:
        import anywidget
        import traitlets
    except ImportError:
        return widgets.Textarea(placeholder=NO_ANYWIDGET, layout=widgets.Layout(width="100%"))

    class PromptInput(anywidget.AnyWidget):
        _esm = _ESM
        value = traitlets.Unicode("").tag(sync=True)

        def typed(self, text: str) -> None:
            """Record the browser's text without sending it back (``set_state`` does not echo)."""
            self.set_state({"value": text})

        def taken(self, text: str) -> None:
            """The panel asked ``text``: empty the kernel's copy and tell the browser to drop it."""
            self.typed("")
            self.send({"event": "sent", "text": text})

    return PromptInput(layout=widgets.Layout(width="100%"))


class _Turn:
    """One question and its answer in the list: the answer's HTML widget is updated as it streams, and its
    mark bar (👍 👎 Correct) appears under it once it is finished."""

    def __init__(self, prompt: str, answer: Any, marks: MarkBar) -> None:
        self.prompt = prompt
        self.answer = answer
        self.marks = marks
        self.parts: list[str] = []
        self.shown = 0.0


def reply_html(reply: Reply) -> str:
    """A finished answer: sanitized Markdown, a stopped mark, citations that open their passage, figures."""
    from . import render

    stopped = "<p class='sage-stopped'><strong>(stopped: partial answer)</strong></p>" if reply.cancelled else ""
    cites = "".join(
        f"<details class='sage-citation'><summary>[{int(c['n'])}] {html.escape(str(c['source']))}"
        + (f" — {html.escape(str(c['location']))}" if c.get("location") else "") + "</summary>"
        + (render.markdown_html(c["text"]) if c.get("text") else "<em>(passage text not recorded)</em>")
        + "</details>"
        for c in reply.citations)
    footer = html.escape(render.footer_text(reply))
    return (f"<div class='sage-answer'>{render.markdown_html(reply.text)}</div>{stopped}{cites}"
            f"<div class='sage-footer' style='color: #777; font-size: 0.85em'>{footer}</div>")


class ChatWidget:
    """``ChatWidget(session, options)``; displays itself. ``.session`` is the kernel session behind it.

    ``interval`` throttles streaming redraws (the first token is drawn at once, later ones at most every
    ``interval`` s); ``export_dir`` is where Export writes its transcript; ``on_reply`` gets each answer asked
    in this panel (``%sage_chat -o VAR`` stores it). :meth:`close` when the panel is done with.
    """

    def __init__(self, session: Session, options: argparse.Namespace, interval: float = 0.1,
                 export_dir: str | Path = ".", on_reply: Callable[[Reply], None] | None = None) -> None:
        import ipywidgets as widgets

        from ..faces.options import MAX_TOP_K, MIN_TOP_K

        self.session = session
        self.options = options
        self.interval = interval
        self.export_dir = Path(export_dir)
        self.on_reply = on_reply
        self.messages = widgets.VBox([], layout=widgets.Layout(max_height="32em", overflow="auto"))
        self.input = _prompt_input()
        if hasattr(self.input, "on_msg"):
            self.input.on_msg(self._on_input_msg)
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.stop_button = widgets.Button(description="Stop", disabled=True)
        self.clear_button = widgets.Button(description="Clear")
        self.export_button = widgets.Button(description="Export")
        current = options.finetune_model
        self.finetune = widgets.Dropdown(
            description="Fine-tune", options=self._finetune_choices(current), value=current,
            layout=widgets.Layout(display="" if options.backend == "finetune" else "none"))
        self.index = widgets.Dropdown(description="Index", options=self._index_choices(options.index),
                                      value=options.index or "")
        self.top_k = widgets.BoundedIntText(description="Top-k", value=options.top_k, min=MIN_TOP_K, max=MAX_TOP_K,
                                            layout=widgets.Layout(width="10em"))
        self.status = widgets.HTML()
        self.progress = widgets.FloatProgress(min=0, max=1, layout=widgets.Layout(display="none", width="12em"))
        self.saved = widgets.HTML(_HIDE_GONE)  # a live panel hides the "kernel gone" note above it
        self.box = widgets.VBox([
            widgets.HBox([self.finetune, self.index, self.top_k]),
            self.messages,
            self.input,
            widgets.HBox([self.send_button, self.stop_button, self.clear_button, self.export_button, self.saved]),
            widgets.HBox([self.progress, self.status]),
        ], layout=widgets.Layout(border="1px solid #ccc", padding="4px"))
        self.box.add_class("sage-chat")
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.export_button.on_click(lambda _: self.export())
        self._turns: dict[int, _Turn] = {}
        self._marks: dict[str, MarkBar] = {}  # turn id -> the bar under that answer
        self._spare: tuple[Any, Any, MarkBar] | None = None
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._cancel: threading.Event | None = None
        for reply in session.current_replies():  # the conversation since the last reset, whoever asked it
            turn = self._add(reply.prompt)
            turn.answer.value = reply_html(reply)
            self._attach(turn, reply)
        self._make_spare()
        self._set_status("ready" if current else self._pick_hint())
        self._unsubscribe = session.subscribe(self._on_event)
        self._worker = threading.Thread(target=self._work, daemon=True, name="sage-chat")
        self._worker.start()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)

    # --- actions (buttons) ---------------------------------------------------------------------------------

    def current_options(self) -> argparse.Namespace:
        """The chat options the next question uses: the panel's picker, index and top-k over ``%sage_chat``'s."""
        args = argparse.Namespace(**vars(self.options))
        if args.backend == "finetune" and self.finetune.value:
            args.finetune_model = self.finetune.value
        args.index, args.top_k = self.index.value or None, self.top_k.value
        return args

    def _on_input_msg(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        text = str(content.get("text", ""))
        if content.get("event") == "input":
            self.input.typed(text)
        elif content.get("event") == "submit":
            self.input.typed(text)
            self.send()

    def send(self, text: str | None = None) -> threading.Event | None:
        """Ask ``text`` (default: the input box). Returns an event set once the answer is complete.

        A busy panel, or one with no fine-tune picked yet, ignores it and the input keeps the text, so nothing
        typed is lost."""
        prompt = self.input.value if text is None else text
        if not prompt.strip() or self.send_button.disabled:
            return None
        if self.options.backend == "finetune" and not self.finetune.value:
            self._set_status(self._pick_hint())
            return None
        if text is None:
            if hasattr(self.input, "taken"):
                self.input.taken(prompt)
            else:
                self.input.value = ""
        done = threading.Event()
        self._cancel = threading.Event()
        self.send_button.disabled, self.stop_button.disabled = True, False
        self._jobs.put((prompt.rstrip("\n"), self.current_options(), self._cancel, done))
        return done

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def clear(self) -> None:
        """Start a new conversation: the model forgets it (for ``%%sage`` too); Export still has it."""
        self.session.reset()
        with self._lock:
            spare = self._spare
            self.messages.children = (spare[0], spare[1], spare[2].box) if spare else ()
            self._marks.clear()
        self.saved.value = _HIDE_GONE

    def export(self) -> Path | None:
        """Write the session's transcript (citations and figures included) and show where."""
        path = self.export_dir / f"sage-chat-{datetime.now():%Y%m%d-%H%M%S}.md"
        try:
            written = self.session.export(path)
        except SageError as error:
            self.saved.value = f"{_HIDE_GONE}<span style='color: #b00'>{html.escape(str(error))}</span>"
            return None
        self.saved.value = f"{_HIDE_GONE}saved to <code class='sage-export'>{html.escape(str(written))}</code>"
        return written

    def close(self) -> None:
        """Stop following the session, cancel the answer in progress, end the worker, close every widget."""
        self._unsubscribe()
        self.stop()
        self._jobs.put(None)  # the worker returns once the current answer, if any, has ended
        _close_tree(self.box)

    def _pick_hint(self) -> str:
        if self.finetune.options:
            return "Pick a fine-tune above: its server starts (or is reused) when you send the first question."
        return ("No fine-tunes yet: run %sage finetune demo in a cell to build two to try (or train one with "
                "%sage finetune train), then run %sage_chat again.")

    # --- drawing -------------------------------------------------------------------------------------------

    @property
    def shown(self) -> tuple[Any, ...]:
        """The message widgets a person sees: questions and answers in order (the hidden spare left out)."""
        return tuple(w for w in self.messages.children
                     if "sage-spare" not in w._dom_classes and "sage-marks" not in w._dom_classes)

    def _add(self, prompt: str) -> _Turn:
        """A new turn at the end of the list: the spare when there is one (see the module docstring)."""
        question_html = (f"<div class='sage-user'><strong>You:</strong> "
                         f"<span style='white-space: pre-wrap'>{html.escape(prompt)}</span></div>")
        if self._spare is None:
            self._make_spare()
        question, answer, marks = self._spare
        self._spare = None
        with question.hold_sync():  # one message per widget
            question.value = question_html
            question.remove_class("sage-spare")
        with answer.hold_sync():
            answer.value = "<em>…</em>"
            answer.remove_class("sage-spare")
            answer.add_class("sage-model")
        return _Turn(prompt, answer, marks)

    def _make_spare(self) -> None:
        import ipywidgets as widgets

        question, answer, marks = widgets.HTML(), widgets.HTML(), MarkBar()
        for part in (question, answer):
            part.add_class("sage-spare")
        self.messages.children = (*self.messages.children, question, answer, marks.box)
        self._spare = (question, answer, marks)

    def _attach(self, turn: _Turn, reply: Reply) -> None:
        """The finished answer's mark bar, findable by its turn when another face marks it."""
        turn.marks.attach(self.session, reply)
        if turn.marks.turn is not None:
            self._marks[turn.marks.turn] = turn.marks

    def _finetune_choices(self, current: str | None) -> list[str]:
        """The usable fine-tunes, and the one asked for even when it is not (its error shows on Send)."""
        tunes = [e.name for e in self.session.finetunes() if e.problem is None]
        return tunes if current in tunes or current is None else [current, *tunes]

    def _index_choices(self, current: str | None) -> list[tuple[str, str]]:
        names = [i.name for i in self.session.indexes()]
        if current and current not in names:
            names.insert(0, current)
        return [("(none)", "")] + [(name, name) for name in names]

    def _refresh_choices(self, what: str) -> None:
        """A fine-tune was trained or an index built since the panel opened: offer it, keep the selection."""
        picker, choices = ((self.finetune, self._finetune_choices) if what == "finetunes"
                           else (self.index, self._index_choices))
        value = picker.value
        picker.options = choices(value or None)
        picker.value = value

    def _on_event(self, event: Event) -> None:
        """Every session event, from whichever thread caused it: a turn from any face appears here."""
        from . import render

        if event.kind == "catalog-changed":
            self._refresh_choices(str(event.data))
            return
        if event.kind == "marked":
            bar = self._marks.get(event.data.get("turn"))
            if bar is not None:
                bar.show(event.data)
            return
        if event.kind == "started":
            with self._lock:
                self._turns[event.call] = self._add(str(event.data))
            return
        turn = self._turns.get(event.call)
        if turn is None:
            return
        if event.kind == "delta":
            turn.parts.append(event.data)
            now = time.monotonic()
            if now - turn.shown >= self.interval:  # the first token at once, then throttled
                turn.shown = now
                turn.answer.value = render.streaming("".join(turn.parts))[render.MIME]
            return
        self._turns.pop(event.call, None)
        self._finish(turn, event)
        if isinstance(event.data, Reply):
            self._attach(turn, event.data)
        with self._lock:
            if self._spare is None:  # the next turn's widgets, made after the answer is drawn
                self._make_spare()

    @staticmethod
    def _finish(turn: _Turn, event: Event) -> None:
        """Draw a turn's final state: the answer, a comparison, the error, or what streamed before a stop."""
        from . import render

        if isinstance(event.data, Reply):
            turn.answer.value = reply_html(event.data)
        elif isinstance(event.data, list):  # a --compare: one-off answers side by side
            turn.answer.value = render.compare([r.model for r in event.data], {}, event.data)[render.MIME]
        elif event.kind == "failed":  # a SageError says what to do; anything else says what it is
            error = event.data
            text = str(error) if isinstance(error, SageError) else f"{type(error).__name__}: {error}"
            turn.answer.value = render.error(text)[render.MIME]
        else:  # interrupted without a reply: keep what streamed
            turn.answer.value = (render.markdown_html("".join(turn.parts))
                                 + "<p class='sage-stopped'><strong>(stopped: partial answer)</strong></p>")

    def _set_status(self, text: str, fraction: float | None = None, starting: bool = False) -> None:
        self.status.value = f"<span class='sage-status' style='color: #555'>{html.escape(text)}</span>"
        self.progress.layout.display = "" if starting else "none"
        self.progress.value = fraction if fraction is not None else 0.0
        self.progress.bar_style = "" if fraction is not None else "info"

    def _progress(self, started: float) -> Callable[[Any], None]:
        def show(event: Any) -> None:
            phase = "merging" if event.phase.startswith("merg") else event.phase
            # a reuse takes milliseconds: no progress bar that would only flicker
            self._set_status(f"{phase}: {event.message} ({time.monotonic() - started:.0f} s)", event.fraction,
                             starting=event.phase != "reuse")
        return show

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:  # None: the panel was closed
            prompt, args, cancel, done = job
            started = time.monotonic()
            try:
                reply = self.session.ask(prompt, args, on_progress=self._progress(started), cancel=cancel)
                self._set_status(f"ready · {reply.model}" + (" · stopped" if reply.cancelled else ""))
                if self.on_reply is not None:
                    self.on_reply(reply)
            except SageError:  # shown in its turn by the "failed" event
                self._set_status("failed")
            except Exception as error:  # the worker must survive anything, and say what happened
                self._set_status(f"failed: {error!r}")
            finally:
                self.send_button.disabled, self.stop_button.disabled = False, True
                done.set()


def _close_tree(widget: Any) -> None:
    """Close a widget, its children, layouts and styles: each is a model the front end and the kernel keep."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None), widget):
        if part is not None:
            part.close()
