"""Loading and unloading the extension: the magics, the Err[n] recorder, and how IPython shows a Reply.

Our errors show as one paragraph through their own ``_render_traceback_`` (core/errors.py, parsing.py), not
through ``set_custom_exc``: a shell has one custom exception handler, and another extension may own it."""

from __future__ import annotations

import importlib
import threading
from typing import Any

from .magics import SageMagics

_REPLY = ("sage_magic.chat.reply", "Reply")
#: What a kernel's first question imports besides the magics (the session, the option parser, the manager and
#: its registry, the HTTP client, the streaming display): ~60 ms on a quiet 2-core machine, several times that
#: under load. A thread imports them once the extension is loaded, so that a question asked a moment later
#: finds them ready instead of paying for them before its first token.
_FIRST_QUESTION = ("sage_magic.chat.session", "sage_magic.faces.options", "sage_magic.notebook.interpolate",
                   "sage_magic.chat.backends", "sage_magic.chat.conversation", "sage_magic.notebook.render")


def register(shell: Any) -> SageMagics:
    """Register the magics, the Err[n] recorder and the Reply display (SageMagics.display_reply) on ``shell``."""
    from .interpolate import record_error

    magics = SageMagics(shell=shell, parent=shell)
    shell.register_magics(magics)
    shell.configurables.append(magics)
    shell.user_ns.setdefault("Err", {})

    def record(result: Any) -> None:
        record_error(shell.user_ns, result.execution_count, result.error_in_exec)
        magics.cell_finished()

    magics._record = record  # type: ignore[attr-defined]
    shell.events.register("post_run_cell", record)
    # by name: the chat package loads at the first question, not at %load_ext
    shell.display_formatter.ipython_display_formatter.for_type_by_name(*_REPLY, magics.display_reply)
    magics.start_prewarm()  # SageMagics.prewarm / SAGE_PREWARM, on a thread: the load returns at once
    threading.Thread(target=_import_first_question, daemon=True, name="sage-preload").start()
    return magics


def _import_first_question() -> None:
    """Import what the first question needs (see _FIRST_QUESTION). A module that fails to import is left to
    the question itself, which explains the error where the user sees it."""
    for name in _FIRST_QUESTION:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported by the question that needs it
            return


def unregister(shell: Any) -> None:
    """Undo :func:`register`: magics, hook and display; leave the session's servers (they follow keep-alive)."""
    magics = shell.magics_manager.registry.pop("SageMagics", None)
    for kind, name in (("cell", "sage"), ("line", "sage"), ("line", "sage_chat")):
        shell.magics_manager.magics[kind].pop(name, None)
    if magics is None:
        return
    if magics in shell.configurables:
        shell.configurables.remove(magics)
    shell.display_formatter.ipython_display_formatter.pop(".".join(_REPLY), None)
    try:
        shell.events.unregister("post_run_cell", magics._record)
    except ValueError:
        pass
    magics.close()
