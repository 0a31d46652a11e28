"""The minimal ``%sage_chat`` widget: a question box, Send, Stop, and answers that stream in.

The full chat panel is a later issue; this one already works end to end on the kernel's
:class:`~sage_magic.session.Session`, so it continues the same conversation as ``%%sage``. Answers stream on
ONE long-lived worker thread, never on the kernel's main thread (the notebook stays usable while the model
writes) and never on a short-lived thread (a server started from a thread that exits would die with it:
PR_SET_PDEATHSIG follows the forking thread). Stop sets the answer's cancel event from the comm thread.
"""

from __future__ import annotations

import argparse
import html
import queue
import threading
import time
from typing import Any

from .errors import SageError
from .session import Session


class ChatWidget:
    """``ChatWidget(session, options)``; displays itself. ``.session`` is the kernel session behind it."""

    def __init__(self, session: Session, options: argparse.Namespace, interval: float = 0.1) -> None:
        import ipywidgets as widgets

        self.session = session
        self.options = options
        self.interval = interval
        self.messages = widgets.VBox([])
        self.input = widgets.Textarea(placeholder="Ask your model…", layout=widgets.Layout(width="70%"))
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.stop_button = widgets.Button(description="Stop", disabled=True)
        self.box = widgets.VBox([self.messages, widgets.HBox([self.input, self.send_button, self.stop_button])])
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self._jobs: queue.Queue = queue.Queue()
        self._cancel: threading.Event | None = None
        self._worker = threading.Thread(target=self._work, daemon=True, name="sage-chat")
        self._worker.start()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)

    def send(self, text: str | None = None) -> threading.Event | None:
        """Ask ``text`` (default: the input box). Returns an event set once the answer is complete."""
        import ipywidgets as widgets

        prompt = self.input.value if text is None else text
        if not prompt.strip():
            return None
        self.input.value = ""
        answer = widgets.HTML("<em>…</em>")
        self.messages.children = (*self.messages.children,
                                  widgets.HTML(f"<p><strong>You:</strong> {html.escape(prompt)}</p>"), answer)
        done = threading.Event()
        self._cancel = threading.Event()
        self.send_button.disabled, self.stop_button.disabled = True, False
        self._jobs.put((prompt, answer, self._cancel, done))
        return done

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def _work(self) -> None:
        from . import render

        while True:
            prompt, answer, cancel, done = self._jobs.get()
            parts: list[str] = []
            last = [0.0]

            def delta(text: str) -> None:
                parts.append(text)
                if time.monotonic() - last[0] >= self.interval:
                    last[0] = time.monotonic()
                    answer.value = render.streaming("".join(parts))[render.MIME]

            try:
                reply = self.session.ask(prompt, argparse.Namespace(**vars(self.options)), on_delta=delta,
                                         cancel=cancel)
                answer.value = render.answer(reply, "markdown")[0][render.MIME]
            except SageError as error:
                answer.value = render.error(str(error))[render.MIME]
            except Exception as error:  # the worker must survive anything, and say what happened
                answer.value = render.error(f"Unexpected failure: {error!r}")[render.MIME]
            finally:
                self.send_button.disabled, self.stop_button.disabled = False, True
                done.set()
