"""Loading and unloading the extension: the magics and the Err[n] recorder.

Our errors show as one paragraph through their own ``_render_traceback_`` (core/errors.py, parsing.py), not
through ``set_custom_exc``: a shell has one custom exception handler, and another extension may own it."""

from __future__ import annotations

from typing import Any

from .magics import SageMagics


def register(shell: Any) -> SageMagics:
    """Register the magics and the Err[n] recorder on ``shell``."""
    from .interpolate import record_error

    magics = SageMagics(shell=shell, parent=shell)
    shell.register_magics(magics)
    shell.configurables.append(magics)
    shell.user_ns.setdefault("Err", {})

    def record(result: Any) -> None:
        record_error(shell.user_ns, result.execution_count, result.error_in_exec)

    magics._record = record  # type: ignore[attr-defined]
    shell.events.register("post_run_cell", record)
    return magics


def unregister(shell: Any) -> None:
    """Undo :func:`register`: magics and hook; leave the session's servers (they follow keep-alive)."""
    magics = shell.magics_manager.registry.pop("SageMagics", None)
    for kind, name in (("cell", "sage"), ("line", "sage"), ("line", "sage_chat")):
        shell.magics_manager.magics[kind].pop(name, None)
    if magics is None:
        return
    if magics in shell.configurables:
        shell.configurables.remove(magics)
    try:
        shell.events.unregister("post_run_cell", magics._record)
    except ValueError:
        pass
    magics.close()
