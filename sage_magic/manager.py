"""The manager: the one place that decides which vLLM server answers for a model, and when it goes away.

Faces (magics, chat widget, ``sage`` CLI, server extension) only ask it for an :class:`Endpoint`. It
resolves the fine-tune, merges it when asked, reuses a running server that provably serves exactly that
model (``/v1/models`` checked, never "something answers on the port"), adds LoRA adapters to a running
base server at runtime, or starts a new server under a supervisor. The process it runs in becomes an
owner of every server it hands out, and stops owning them on :meth:`Manager.close` (called at exit too;
the supervisor covers the deaths that run no exit code).
"""

from __future__ import annotations

import atexit
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import server_logs
from .catalog import FineTune, check_adapter, get_finetune
from .config import Settings
from .endpoint import Endpoint
from .errors import NotFound, ServerFailed
from .fingerprint import adapter_digest, base_identity, combine
from .http import HttpError, request_json, request_text
from .launch import log_tail, start_server, wait_ready
from .merge import ensure_merged, merge_fingerprint
from .progress import Progress, ProgressCallback, silent
from .registry import Owner, Registry, ServerRecord, is_ours, kill_group


@dataclass(frozen=True)
class ServerStatus:
    """A row of `sage ps`."""

    record: ServerRecord
    memory_bytes: int
    uptime: float
    alive_owners: int

    def as_dict(self) -> dict[str, object]:
        r = self.record
        return {"id": r.id, "name": r.served_name, "kind": r.kind, "adapters": sorted(r.adapters),
                "model_path": r.model_path, "port": r.port, "url": r.tcp_url, "socket": r.socket, "pid": r.pid,
                "supervisor_pid": r.supervisor_pid, "owners": self.alive_owners, "state": r.state,
                "uptime_s": round(self.uptime, 1), "memory_bytes": self.memory_bytes,
                "keep_alive": r.keep_alive, "idle_until": r.idle_until, "log": r.log_path}


@dataclass(frozen=True)
class _Spec:
    """What a server must serve: ``identity`` covers the weights and every argument that changes serving."""

    kind: str  # "base" (LoRA-enabled) or "merged"
    model_path: Path
    served_name: str
    identity: str
    extra_args: tuple[str, ...]


class Manager:
    """Owns this process's share of model servers. One per process is the normal case (see ``shared``)."""

    def __init__(self, settings: Settings, progress: ProgressCallback = silent) -> None:
        self.settings = settings
        self.progress = progress
        self.registry = Registry(settings.runtime_dir)
        self._held: set[str] = set()  # servers this manager has added its process to as an owner
        self._supervisors: dict[str, subprocess.Popen] = {}  # their stdin stays open until this process dies
        self._lock = threading.Lock()
        atexit.register(self.close)

    # --- asking for endpoints ----------------------------------------------------------------------------

    def serve_finetune(self, name: str, *, merge: bool = False, port: int | None = None,
                       extra_args: tuple[str, ...] = (), keep_alive: float | None = None) -> Endpoint:
        """An endpoint serving fine-tune NAME: unmerged (adapter on a shared base server) or merged."""
        ft = get_finetune(self.settings, name)
        if merge:
            merged = ensure_merged(self.settings, ft, self.progress)
            spec = _Spec("merged", merged, ft.name, combine(merge_fingerprint(ft), *self.settings.vllm_args,
                                                            *extra_args), tuple(extra_args))
            record, launched, _ = self._ensure_server(spec, port, keep_alive)
            return _endpoint(record, ft.name, launched)
        check_adapter(self.settings, ft)
        spec = self._base_spec(ft.base_path, _display_name(ft.base_ref), tuple(extra_args))
        record, launched, models = self._ensure_server(spec, port, keep_alive)
        try:
            self._ensure_adapter(record, ft, models)
        except BaseException:
            self.release(record.id)  # a base server nobody asked for on its own must not stay on our account
            raise
        return _endpoint(record, ft.name, launched)

    def serve_model(self, path: str | Path, *, port: int | None = None, extra_args: tuple[str, ...] = (),
                    keep_alive: float | None = None) -> Endpoint:
        """An endpoint serving a plain local model folder (`sage chat --backend vllm --model PATH`)."""
        model = Path(path).expanduser()
        if not (model / "config.json").is_file():
            raise NotFound(f"{model} is not a model folder (no config.json). Give the folder of a "
                           "Hugging Face-format model; nothing is downloaded.")
        spec = self._base_spec(model.resolve(), model.name, tuple(extra_args))
        record, launched, _ = self._ensure_server(spec, port, keep_alive)
        return _endpoint(record, spec.served_name, launched)

    def _base_spec(self, model: Path, served_name: str, extra_args: tuple[str, ...]) -> _Spec:
        identity = combine(base_identity(model), f"lora-rank={self.settings.max_lora_rank}",
                           *self.settings.vllm_args, *extra_args)
        return _Spec("base", model, served_name, identity, extra_args)

    # --- servers -----------------------------------------------------------------------------------------

    def _ensure_server(self, spec: _Spec, port: int | None,
                       keep_alive: float | None) -> tuple[ServerRecord, bool, dict[str, dict]]:
        """A ready server for ``spec`` that this process now owns, whether it was started just now, and what
        it serves (its /v1/models by id)."""
        me = Owner.this_process()
        with self.registry.locked():
            self.registry.reap()
            record = next((r for r in self.registry.all() if r.kind == spec.kind and r.identity == spec.identity
                           and r.state != "stopping"), None)
            if record is not None:
                if record.id not in self._held:
                    record.owners.append(me)
                record.idle_until = None
                if keep_alive is not None:
                    record.keep_alive = keep_alive
                self.registry.save(record)
                launched = False
            else:
                record = self._launch(spec, port, keep_alive, me)
                launched = True
        with self._lock:
            self._held.add(record.id)
        what = f"{spec.served_name} ({spec.kind})"
        if not launched:
            self.progress(Progress("reuse", f"{what}: reusing server {record.id}{_on_port(record)}"))
        try:
            started = time.monotonic()
            record = wait_ready(self.registry, record.id, record.log_path, self.settings.ready_timeout,
                                self.progress, what)
            models = self._confirm(record, spec)
        except BaseException:
            self.release(record.id)
            raise
        if launched:
            seconds = time.monotonic() - started
            with self.registry.locked():
                current = self.registry.get(record.id)
                if current is not None:
                    current.state, current.ready_seconds = "ready", round(seconds, 2)
                    self.registry.save(current)
                    record = current
            self.progress(Progress("ready", f"{what}: ready in {seconds:.0f} s (server {record.id}"
                                            f"{_on_port(record)})", 1.0))
        return record, launched, models

    def _launch(self, spec: _Spec, port: int | None, keep_alive: float | None, me: Owner) -> ServerRecord:
        """Start a server (registry lock held): see launch.start_server."""
        launched = start_server(self.settings, self.registry, kind=spec.kind, identity=spec.identity,
                                model_path=spec.model_path, served_name=spec.served_name,
                                extra_args=spec.extra_args, port=port, keep_alive=keep_alive, owner=me)
        record = launched.record
        self._supervisors[record.id] = launched.supervisor
        if launched.port_note:
            self.progress(Progress("port", launched.port_note))
        where = f"socket and port {record.port}" if record.port else "its private socket"
        self.progress(Progress("launch", f"{spec.served_name}: starting vLLM on {where} "
                                         f"(server {record.id}, log {record.log_path})"))
        return record

    def _confirm(self, record: ServerRecord, spec: _Spec) -> dict[str, dict]:
        """Trust a server only once it says it serves this model from this path; return what it serves."""
        models = self._models(record)
        if models.get(spec.served_name, {}).get("root") != str(spec.model_path):
            raise ServerFailed(
                f"Server {record.id} does not serve {spec.served_name} from "
                f"{spec.model_path} (it lists {sorted(models)}). Stop it with `sage stop {record.id}` and retry."
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

    def _ensure_adapter(self, record: ServerRecord, ft: FineTune, models: dict[str, dict]) -> None:
        """Load (or reload, if retrained) the fine-tune's adapter into a running base server."""
        fingerprint = adapter_digest(ft.adapter_dir)
        listed = models.get(ft.name)
        current = self.registry.get(record.id)
        known = current.adapters.get(ft.name) if current else None
        if listed and listed.get("root") == str(ft.adapter_dir) and known and known["fingerprint"] == fingerprint:
            return
        started = time.monotonic()
        payload = {"lora_name": ft.name, "lora_path": str(ft.adapter_dir), "load_inplace": bool(listed)}
        try:
            # vLLM answers this one in plain text ("Success: LoRA adapter ... added"), not JSON
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
        self.progress(Progress("adapter", f"{ft.name}: adapter added to server {record.id} in "
                                          f"{time.monotonic() - started:.2f} s", 1.0))

    # --- ownership -----------------------------------------------------------------------------------------

    def release(self, server_id: str) -> None:
        """Stop owning one server; the supervisor stops it if no owner is left (after keep-alive)."""
        with self._lock:
            if server_id not in self._held:
                return
            self._held.discard(server_id)
        me = Owner.this_process()
        with self.registry.locked():
            record = self.registry.get(server_id)
            if record is not None and me in record.owners:
                record.owners.remove(me)
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
        """Leave every server this manager holds. Safe to call twice; registered with atexit.

        With ``wait``, return only once the servers that this left without owner and without keep-alive
        are gone, so that a one-shot command leaves nothing running behind it when it returns.
        """
        left = [self.registry.get(server_id) for server_id in self._held]
        for record in left:
            if record is not None:
                self.release(record.id)
        if not wait:
            return
        deadline = time.monotonic() + self.settings.stop_grace + 10
        for record in left:
            if record is None:
                continue
            current = self.registry.get(record.id)
            if current is not None and (current.owners or current.keep_alive != 0):
                continue  # it stays, for another owner or for its keep-alive
            try:  # the supervisor exits last: after the server's process group and its registry record
                psutil.Process(record.supervisor_pid).wait(timeout=max(0.1, deadline - time.monotonic()))
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
        self._reap_supervisors()

    # --- what `sage ps / stop / logs` ask ------------------------------------------------------------------

    def servers(self) -> list[ServerStatus]:
        with self.registry.locked():
            self.registry.reap()
        return [_status(r) for r in self.registry.all()]

    def stop(self, target: str, wait: float | None = None) -> ServerRecord:
        """Stop a server we started, whoever owns it: the supervisor does the stopping."""
        record = self.registry.find(target)
        deadline = time.monotonic() + (wait if wait is not None else self.settings.stop_grace + 10)
        if is_ours(record.supervisor_pid, record.id):
            supervisor = psutil.Process(record.supervisor_pid)
            supervisor.terminate()
            try:  # it removes the record, then exits: "stopped" means both
                supervisor.wait(timeout=max(0.1, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                pass
        if self.registry.get(record.id) is not None:  # supervisor gone or stuck: do it ourselves
            if is_ours(record.pid, record.id):
                kill_group(record.pid, self.settings.stop_grace)
            with self.registry.locked():
                self.registry.remove(record.id)
        with self._lock:
            self._held.discard(record.id)
        self._reap_supervisors()
        return record

    def stop_all(self) -> list[ServerRecord]:
        return [self.stop(r.id) for r in self.registry.all()]

    def logs(self, target: str, lines: int = 50) -> str:
        """The end of a server's log, also after the server is gone (see server_logs)."""
        return log_tail(server_logs.find(self.registry, target), lines)


def _endpoint(record: ServerRecord, model: str, launched: bool) -> Endpoint:
    return Endpoint(record.base_url, record.api_key, model, record.id, reused=not launched, socket=record.socket)


def _on_port(record: ServerRecord) -> str:
    """Where other programs reach a server: only when a TCP port was asked for (see gateway.py)."""
    return f", also at {record.tcp_url}" if record.port else ""


def _status(record: ServerRecord) -> ServerStatus:
    memory = 0
    if record.pid:
        try:
            leader = psutil.Process(record.pid)
            memory = sum(p.memory_info().rss for p in [leader, *leader.children(recursive=True)])
        except psutil.Error:
            pass
    owners = sum(1 for o in record.owners if o.alive())
    return ServerStatus(record, memory, time.time() - record.started_at, owners)


def _display_name(ref: str) -> str:
    """A served name for a base given as a path or hub-style name: the last path component."""
    return Path(ref).name or ref


_shared: dict[tuple, Manager] = {}


def shared(settings: Settings, progress: ProgressCallback = silent) -> Manager:
    """The process-wide manager for these settings, so every face in one kernel shares its servers."""
    key = (settings.home, settings.runtime_dir)
    manager = _shared.get(key)
    if manager is None:
        manager = _shared[key] = Manager(settings, progress)
    else:
        manager.progress = progress
    return manager

