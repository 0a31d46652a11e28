"""👍, 👎 and Correct under an answer: the one widget the chat panel shows under every answer and
``%sage correct N`` shows under its cell.

Each click stores a mark at once through ``Session.mark`` (the feedback store's append-only file), so a
kernel that dies a second later keeps it. The bar also shows marks made elsewhere: ``%sage rate bad 2`` on
an answer a panel shows lights that answer's 👎 (the session's "marked" event, see panel.py).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from ..core.errors import SageError

if TYPE_CHECKING:
    from ..chat.reply import Reply
    from ..chat.session import Session

_STYLE = {"good": "success", "bad": "danger"}


class MarkBar:
    """The buttons and the correction editor for one answer; ``.box`` is the widget to show."""

    def __init__(self) -> None:
        import ipywidgets as widgets

        small = widgets.Layout(width="auto")
        self.good = widgets.Button(description="👍", tooltip="a good answer: train on it as it is", layout=small)
        self.bad = widgets.Button(description="👎", tooltip="a bad answer", layout=small)
        self.correct = widgets.Button(description="Correct", tooltip="write the answer it should have given",
                                      layout=small)
        self.note = widgets.HTML()
        self.editor = widgets.Textarea(layout=widgets.Layout(width="100%"), rows=4)
        self.save = widgets.Button(description="Save correction", button_style="primary", layout=small)
        self.cancel = widgets.Button(description="Cancel", layout=small)
        self.editing = widgets.VBox([self.editor, widgets.HBox([self.save, self.cancel])],
                                    layout=widgets.Layout(display="none"))
        self.box = widgets.VBox([widgets.HBox([self.good, self.bad, self.correct, self.note]), self.editing],
                                layout=widgets.Layout(display="none"))
        self.box.add_class("sage-marks")
        self.session: Session | None = None
        self.reply: Reply | None = None
        self.good.on_click(lambda _: self._store(rating="good"))
        self.bad.on_click(lambda _: self._store(rating="bad"))
        self.correct.on_click(lambda _: self.open_editor())
        self.save.on_click(lambda _: self._store(correction=self.editor.value))
        self.cancel.on_click(lambda _: self._close_editor())

    @property
    def turn(self) -> str | None:
        return self.reply.feedback["turn"] if self.reply is not None and self.reply.feedback else None

    def attach(self, session: Session, reply: Reply) -> None:
        """Show the bar for ``reply`` (a comparison's answers and unmarkable ones get none)."""
        self.session, self.reply = session, reply
        self.box.layout.display = "" if reply.feedback is not None else "none"

    def open_editor(self) -> None:
        """The answer as editable text: the model's own answer stays beside the correction in the store."""
        if self.reply is None:
            return
        self.editor.value = self.reply.text
        self.editing.layout.display = ""

    def _close_editor(self) -> None:
        self.editing.layout.display = "none"

    def _store(self, *, rating: str | None = None, correction: str | None = None) -> None:
        if self.session is None or self.reply is None:
            return
        try:
            self.show(self.session.mark(self.reply, rating=rating, correction=correction))
        except SageError as error:  # an empty correction, a full disk: said in the bar, the editor stays open
            self.note.value = f"<span style='color: #b00'>{html.escape(str(error))}</span>"

    def show(self, mark: dict[str, Any]) -> None:
        """Reflect a stored mark of this bar's answer, whichever face made it."""
        if mark.get("rating") is not None:
            for rating, button in (("good", self.good), ("bad", self.bad)):
                button.button_style = _STYLE[rating] if rating == mark["rating"] else ""
        said = "correction saved" if mark.get("correction") is not None else f"marked {mark.get('rating')}"
        if mark.get("correction") is not None:
            self.correct.button_style = "info"
            self._close_editor()
        self.note.value = f"<span style='color: #555'>{html.escape(said)}</span>"
