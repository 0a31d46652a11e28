"""Loading and unloading the extension: the magics, the Err[n] recorder, and how IPython shows a Reply.

Our errors show as one paragraph through their own ``_render_traceback_`` (core/errors.py, parsing.py), not
through ``set_custom_exc``: a shell has one custom exception handler, and another extension may own it."""

from __future__ import annotations

from typing import Any

from .magics import SageMagics

_REPLY = ("sage_magic.chat.reply", "Reply")


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
    return magics


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
