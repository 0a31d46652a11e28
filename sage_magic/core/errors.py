"""Errors a person can act on.

Every failure the engine expects is a :class:`SageError` whose message is one paragraph: what went wrong
and what to do next. Faces print ``str(error)`` and nothing else; a raw traceback means a bug in sage_magic.
"""

from __future__ import annotations

#: Where a server failure's message turns from its explanation (and logged causes) to the raw log tail.
LOG_TAIL_HEADING = "Last lines of the log:"


def fold(names: list[str] | tuple[str, ...], shown: int = 3) -> str:
    """Names for a message or a table cell that stay one short line however many there are: "a, b, c and 97
    more" (a base server may carry a hundred fine-tunes). A list only one name longer than ``shown`` is given
    whole: that name is shorter than "and 1 more"."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


class SageError(Exception):
    """A failure explained for the user; the message says what to do next."""

    def brief(self) -> str:
        """The message without a log tail: what a notebook cell shows (`%sage logs` shows the log itself)."""
        return str(self).split(f"\n{LOG_TAIL_HEADING}", 1)[0]

    def _render_traceback_(self) -> list[str]:
        """IPython's hook for an exception's own traceback: the one paragraph, so a notebook cell shows what to
        do next and no frames. A hook, not ``set_custom_exc``: the shell has one custom handler, and taking it
        would silence another extension's."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self.brief()}"]


class NotFound(SageError):
    """A fine-tune, model, server or index that does not exist."""


class IncompatibleAdapter(SageError):
    """A LoRA adapter that does not fit its base model or the server's limits."""


class ServerFailed(SageError):
    """A model server that exited or never became ready; the message carries its log tail."""


class MergeFailed(SageError):
    """A LoRA merge that did not complete; nothing half-written is left behind."""


class Cancelled(SageError):
    """The user stopped a long call (a cancel Event was set): an answer, whose partial text the caller keeps,
    or a serve_* call waiting for a merge, a lock or a server, which releases whatever it had taken."""


class RemoteServerError(SageError):
    """A server sage_magic did not start (``--backend openai``) that cannot take a fine-tune as asked: the
    message names the setting to change on that server or the flag to change here."""


class Unreachable(RemoteServerError):
    """No answer at --base-url: a wrong address, a server down, or a firewall."""


class Unauthorized(RemoteServerError):
    """The server refused the API key (HTTP 401): a wrong or missing key."""


class NoLoraSupport(RemoteServerError):
    """The server cannot load LoRA adapters: started without --enable-lora or runtime LoRA updating."""


class ResolverBlind(RemoteServerError):
    """A published adapter the server's LoRA filesystem resolver did not find (it looks in another folder)."""


class AdapterConflict(RemoteServerError):
    """A published or loaded adapter of the same name that is another fine-tune (a colleague's): never used."""
