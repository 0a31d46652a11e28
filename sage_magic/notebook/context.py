"""What a cell handler may use of the magics that called it: the shell, the session, the kernel's trainings.

Subcommands, training cells and eval cells take this instead of the magics class, so they never import the
module that dispatches to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..chat.session import Session


class CellContext(Protocol):
    shell: Any
    update_interval: float
    training: dict[str, Any]  # fine-tune name -> finetune_cells.TrainRun of this kernel

    @property
    def session(self) -> Session: ...
