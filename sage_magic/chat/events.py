"""What a session tells the faces that subscribe to it (the panel redraws from these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The kinds of :class:`Event` a face can observe.
EVENT_KINDS = ("started", "delta", "finished", "cancelled", "failed", "servers-changed", "catalog-changed",
               "marked")


@dataclass(frozen=True)
class Event:
    """Something a face may want to show. ``call`` numbers one ask (0 for servers-changed and
    catalog-changed and marked; catalog-changed's ``data`` says what changed, "finetunes" or "indexes";
    marked's is the stored feedback mark, whose ``turn`` matches the marked reply's).

    Every "started" call ends with exactly one of "finished" (``data``: the Reply, or a list of them for a
    comparison), "cancelled" (the partial Reply, or None when nothing was answered) or "failed" (the
    exception, of any type), so a face never waits on a turn that will not end.
    """

    kind: str
    call: int
    data: Any = None
