"""Loading and unloading the extension: the magics, the one-paragraph error display, the Err[n] recorder."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError

from ..core.errors import SageError
from .magics import SageMagics
from .parsing import OptionError

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
