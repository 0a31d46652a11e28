"""The registry of running model servers: one JSON file per server in a private runtime folder.

Every process that may start, reuse or stop a server (kernels, the CLI, supervisors) reads and writes it
under one exclusive file lock, so that concurrent launches of the same model start exactly one server and
an owner list is never lost to a race. The folder is 0700 and files are 0600: they hold API keys.

Ownership is counted per lease: each endpoint handed out adds one :class:`Owner` entry (a process and a
lease id), releasing it drops exactly that entry, and a process that dies loses all of its entries. So a
failure while serving one fine-tune can never take away the server another caller in the same process holds.
Signalling processes is not done here (see processes.py): the registry holds data.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil

from ..core.errors import NotFound, SageError
from ..core.files import exclusive, write_json_atomic
from ..core.processes import is_ours, kill_group


@dataclass(frozen=True)
class Owner:
    """One lease on a server, held by a process. ``created`` (the process's start time) guards against a
    recycled pid; ``lease`` tells apart the several leases one process may hold (empty: the process itself)."""

    pid: int
    created: float
    lease: str = ""

    @classmethod
    def this_process(cls, lease: str = "") -> "Owner":
        return cls(os.getpid(), _own_start_time(os.getpid()), lease)

    @classmethod
    def of(cls, pid: int, lease: str = "") -> "Owner":
        return cls(pid, psutil.Process(pid).create_time(), lease)

    def same_process(self, other: "Owner") -> bool:
        return self.pid == other.pid and abs(self.created - other.created) < 0.01

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


@functools.lru_cache(maxsize=4)
def _own_start_time(pid: int) -> float:
    """This process's start time, read once per pid (a forked child has another pid, so it reads its own)."""
    return psutil.Process(pid).create_time()


def live_owners(owners: list[Owner]) -> list[Owner]:
    """The owners whose process still runs, in order. Each process is looked up once, however many leases it
    holds: a kernel that asked a hundred fine-tunes of one base holds a hundred leases on one server, and
    the supervisor checks them four times a second."""
    alive: dict[tuple[int, float], bool] = {}
    for owner in owners:
        if (owner.pid, owner.created) not in alive:
            alive[owner.pid, owner.created] = owner.alive()
    return [o for o in owners if alive[o.pid, o.created]]


@dataclass
class ServerRecord:
    """What we know of one server we started. ``kind``: ``base`` (plain model, LoRA enabled for adapters
    loaded at runtime) or ``merged`` (a merged fine-tune)."""

    id: str
    kind: str
    identity: str
    model_path: str
    served_name: str
    host: str
    port: int | None  # the authenticating TCP gateway's port on ``host``; None: the socket only
    api_key: str = field(repr=False)  # never in a repr: notebooks save a cell's last value, logs print reprs
    log_path: str
    supervisor_pid: int
    keep_alive: float
    started_at: float
    state: str = "starting"  # starting -> ready -> stopping
    pid: int | None = None  # the vLLM API server (leader of its own process group)
    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"path", "fingerprint"}
    owners: list[Owner] = field(default_factory=list)
    idle_until: float | None = None  # set while no owner is left and keep-alive runs
    ready_seconds: float | None = None
    socket: str | None = None  # Unix domain socket the server listens on; None: TCP on host:port
    lora_slots: dict[str, int] | None = None  # a base server's LoRA sizing (lora_slots.LoraSlots), as launched
    replaced_by: str | None = None  # a newer server for the same model (grown slots or rank): new calls go there

    @property
    def root_url(self) -> str:
        """Over a socket the host part is nominal: requests carry ``socket`` to reach the server."""
        return "http://localhost" if self.socket else f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def tcp_url(self) -> str | None:
        """What other programs on this machine use (with the key): the gateway's URL, if a port was asked for."""
        return f"http://{self.host}:{self.port}/v1" if self.port else None

    def served_names(self) -> list[str]:
        return [self.served_name, *self.adapters]

    def to_json(self) -> dict:
        """The record as JSON data: a shallow copy (dataclasses.asdict deep-copies every value, a tenth of a
        warm reuse, which writes the record twice)."""
        return {**vars(self), "owners": [dict(vars(o)) for o in self.owners],
                "adapters": {name: dict(entry) for name, entry in self.adapters.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "ServerRecord":
        data = dict(data)
        data["owners"] = [Owner(**o) for o in data.get("owners", [])]
        for key in ("keep_alive", "started_at", "idle_until"):  # a NaN here would crash every `sage ps`
            if data.get(key) is not None and not (isinstance(data[key], (int, float)) and math.isfinite(data[key])):
                raise ValueError(f"{key} is {data[key]!r}")
        return cls(**data)


# What a server id may look like. Ids reach the registry from outside (CLI arguments, the Jupyter server
# extension's URLs): anything else, such as "../x", must never become a file path.
_SERVER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_private_folder(root: Path) -> None:
    """Refuse a runtime folder that someone else could have prepared: the default one has a predictable
    name in /tmp, where any user can create a folder or a symlink of that name first."""
    link = os.lstat(root)
    st = os.stat(root)
    if st.st_uid != os.getuid() or link.st_uid != os.getuid():
        raise SageError(f"The runtime folder {root} belongs to another user. Set SAGE_RUNTIME_DIR to a folder of "
                        "yours, or remove that one.")
    if st.st_mode & 0o022:
        raise SageError(f"The runtime folder {root} is writable by other users, so its records and sockets "
                        f"cannot be trusted. Remove it and start again, or `chmod 700 {root}` if you are sure "
                        "nobody else wrote in it.")


def new_server_id() -> str:
    import secrets  # here: `sage ps/stop/logs` read the registry and never make an id (hashlib, ~5 ms)

    return secrets.token_hex(4)


class Registry:
    """Read and change server records. Call the mutating methods only inside ``with registry.locked():``."""

    def __init__(self, runtime_dir: Path) -> None:
        self.root = runtime_dir
        self.servers = runtime_dir / "servers"
        self.logs = runtime_dir / "logs"

    def _prepare(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_folder(self.root)
        os.chmod(self.root, 0o700)
        for folder in (self.servers, self.logs):
            folder.mkdir(mode=0o700, exist_ok=True)

    @contextmanager
    def locked(self, should_stop: Callable[[], bool] | None = None) -> Iterator["Registry"]:
        """Hold the registry lock. Locks are per open file, so this also excludes other threads: never call
        back into user code (progress callbacks) while holding it. ``should_stop`` is polled while waiting
        (:class:`files.LockBusy` when it says stop)."""
        self._prepare()
        with exclusive(self.root / "registry.lock", should_stop=should_stop):
            yield self

    def _path(self, server_id: str) -> Path:
        return self.servers / f"{server_id}.json"

    def all(self) -> list[ServerRecord]:
        """Every record, oldest first. Reading needs no lock: writes are atomic renames."""
        if not self.servers.is_dir():
            return []
        records = []
        for path in self.servers.glob("*.json"):
            try:
                records.append(ServerRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # removed between glob and read, or written by a newer version
        return sorted(records, key=lambda r: r.started_at)

    def get(self, server_id: str) -> ServerRecord | None:
        """The record with exactly this id, or None (also for a string that is not an id at all)."""
        if not _SERVER_ID.fullmatch(server_id):
            return None
        try:
            return ServerRecord.from_json(json.loads(self._path(server_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def find(self, prefix: str) -> ServerRecord:
        """A record by id, id prefix, or served name (as `sage stop` and `sage logs` accept)."""
        records = self.all()
        matches = [r for r in records if r.id.startswith(prefix) or prefix in r.served_names()]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(f"{r.id} ({r.served_name})" for r in records) or "none"
        if not matches:
            raise NotFound(f"No running server matches {prefix!r}. Running: {known}. `sage ps` lists them.")
        raise SageError(f"{prefix!r} matches several servers: {known}. Give the id shown by `sage ps`.")

    def save(self, record: ServerRecord) -> None:
        """Atomic, not fsynced: a record describes running processes, and after a power loss none runs (an
        fsync was two thirds of a warm reuse's cost, which writes the record twice: lease and release).
        Compact: an indented record of a server with 100 adapters and their leases took 8 ms to encode, and
        made a warm reuse 6x slower than with one adapter (benchmarks/hundred_bench.py)."""
        write_json_atomic(self._path(record.id), record.to_json(), durable=False, compact=True)

    def remove(self, server_id: str) -> None:
        """Forget a server whose processes are gone, with its private folder (socket, vLLM's temp files)."""
        self._path(server_id).unlink(missing_ok=True)
        shutil.rmtree(self.server_dir(server_id), ignore_errors=True)

    def server_dir(self, server_id: str) -> Path:
        """A server's private folder: its Unix socket, and its TMPDIR (vLLM's IPC sockets and temp files).
        Short on purpose: a socket path holds at most 107 bytes (see config.MAX_RUNTIME_DIR_LEN)."""
        return self.root / "s" / server_id

    def log_path(self, server_id: str) -> Path:
        return self.logs / f"{server_id}.log"

    def reap(self) -> list[str]:
        """Drop records whose supervisor is gone, killing any server process group it left behind."""
        reaped = []
        for record in self.all():
            if is_ours(record.supervisor_pid, record.id):
                continue
            if is_ours(record.pid, record.id):
                kill_group(record.pid, grace=5.0)
            self.remove(record.id)
            reaped.append(record.id)
        return reaped
