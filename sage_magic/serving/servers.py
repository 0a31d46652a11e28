"""What `sage ps`, `sage stop` and `sage logs` do to the servers in the registry, whoever started them.

Kept apart from the manager's lease handling: these act on a server as a whole (or on one of its adapters),
never on behalf of one caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from ..core.errors import ServerFailed, fold
from ..core.processes import is_ours, kill_group, terminate_and_wait
from .registry import Registry, ServerRecord, live_owners


@dataclass(frozen=True)
class ServerStatus:
    """A row of `sage ps`."""

    record: ServerRecord
    memory_bytes: int
    uptime: float
    alive_owners: int  # processes (kernels, terminals) using it: one kernel may hold a lease per fine-tune
    supervised: bool = True
    leases: int = 0

    @property
    def state(self) -> str:
        """The record's state, or "stale" when its supervisor is gone: nothing watches or stops that server
        any more, and stopping it (or the next launch) cleans it up."""
        return self.record.state if self.supervised else "stale"

    def as_dict(self) -> dict[str, object]:
        r = self.record
        return {"id": r.id, "name": r.served_name, "kind": r.kind, "adapters": sorted(r.adapters),
                "model_path": r.model_path, "port": r.port, "url": r.tcp_url, "socket": r.socket, "pid": r.pid,
                "supervisor_pid": r.supervisor_pid, "owners": self.alive_owners, "leases": self.leases,
                "state": self.state, "uptime_s": round(self.uptime, 1), "memory_bytes": self.memory_bytes,
                "keep_alive": r.keep_alive, "idle_until": r.idle_until, "log": r.log_path, "lora_slots": r.lora_slots,
                "replaced_by": r.replaced_by}


def statuses(registry: Registry) -> list[ServerStatus]:
    """Every server in the registry, as it stands. Listing changes nothing: faces poll it (the sidebar, over
    an HTTP GET a read-only user may send), so reaping and killing belong to :func:`stop`, the next launch
    (:meth:`Registry.reap`) and the supervisors. A record whose supervisor died shows as "stale"."""
    return [_status(r) for r in registry.all()]


def stop(registry: Registry, record: ServerRecord, grace: float, wait: float | None = None) -> ServerRecord:
    """Mark it stopping (so nobody reuses it from now on), ask its supervisor, and finish the job ourselves
    if the supervisor is gone or stuck. A server already gone counts as stopped."""
    deadline = time.monotonic() + (wait if wait is not None else grace + 10)
    with registry.locked():
        current = registry.get(record.id)
        if current is not None and current.state != "stopping":
            current.state = "stopping"
            registry.save(current)
    # the supervisor removes the record, then exits: "stopped" means both
    terminate_and_wait(record.supervisor_pid, record.id, deadline - time.monotonic())
    if registry.get(record.id) is not None:  # supervisor gone or stuck: do it ourselves
        if is_ours(record.pid, record.id):
            kill_group(record.pid, grace)
        with registry.locked():
            registry.remove(record.id)
    return record


def stop_target(registry: Registry, target: str, grace: float) -> str:
    """`sage stop TARGET`: a server id (or prefix, or served name) stops that server; the name of an adapter
    loaded at runtime unloads only that adapter, and the base server keeps serving the others. Returns what
    was done, in a sentence."""
    record = registry.find(target)
    if target in record.adapters and target != record.served_name and not record.id.startswith(target):
        unload_adapter(registry, record, target)
        rest = fold(sorted(set(record.adapters) - {target})) or "no other adapter"
        return (f"unloaded adapter {target} from server {record.id}; it keeps serving {record.served_name} "
                f"and {rest} (`sage stop {record.id}` stops the whole server)")
    record = stop(registry, record, grace)
    return f"stopped {record.id} ({record.served_name}, port {record.port})"


def stop_all(registry: Registry, grace: float) -> list[ServerRecord]:
    """Stop every server; one that is already gone (it stopped while we stopped the others) is skipped."""
    return [stop(registry, r, grace) for r in registry.all()]


def unload_adapter(registry: Registry, record: ServerRecord, name: str) -> None:
    """Take one runtime adapter off a base server (vLLM's /v1/unload_lora_adapter, a plain-text answer)."""
    from ..core.http import HttpError, request_text  # here: `sage ps` and `sage logs` import this module, no HTTP

    try:
        request_text(f"{record.root_url}/v1/unload_lora_adapter", record.api_key, {"lora_name": name},
                     timeout=30, socket=record.socket)
    except HttpError as error:
        if error.status != 404:  # 404: it was not loaded (any more); the registry catches up below
            raise ServerFailed(f"Server {record.id} did not unload adapter {name!r} ({error}). "
                               f"`sage logs {record.id}` shows why; `sage stop {record.id}` stops "
                               "the whole server.") from None
    with registry.locked():
        current = registry.get(record.id)
        if current is not None and current.adapters.pop(name, None) is not None:
            registry.save(current)


def _status(record: ServerRecord) -> ServerStatus:
    memory = 0
    if is_ours(record.pid, record.id):  # a stale record's pid may be a stranger's by now
        try:
            leader = psutil.Process(record.pid)
            memory = sum(p.memory_info().rss for p in [leader, *leader.children(recursive=True)])
        except psutil.Error:
            pass
    leases = live_owners(record.owners)
    return ServerStatus(record, memory, time.time() - record.started_at, len({(o.pid, o.created) for o in leases}),
                        is_ours(record.supervisor_pid, record.id), len(leases))
