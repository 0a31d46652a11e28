"""The supervisor: a small process that owns one vLLM server's life.

Why a separate process: a kernel can die in ways that run none of its code (SIGKILL, ``now=True``
shutdown, a restart that outlasts 2.5 s), and "Interrupt kernel" sends SIGINT to the kernel's whole process
group. So the manager starts ``python -m sage_magic.serving.supervisor`` in a session of its own with a pipe on
stdin whose only write end the launching process holds: EOF means the launcher is gone, however it died.
Other owners (kernels or CLIs that reuse the server) are watched through the registry by pid and start
time. When no owner is left, the keep-alive runs out, or someone asks (`sage stop` sends SIGTERM), the
supervisor stops the server tree and removes its registry record. The server gets PR_SET_PDEATHSIG, so even
a SIGKILLed supervisor takes the API server with it; the record it leaves is reaped on the next launch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..core.config import DEFAULT_GATEWAY_CONNECTIONS
from ..core.processes import death_signal, kill_group
from .gateway import Gateway
from .registry import Owner, Registry, ServerRecord, live_owners

POLL_SECONDS = 0.25


class Supervisor:
    def __init__(self, registry: Registry, server_id: str, command: list[str], grace: float,
                 gateway_fd: int | None = None, gateway_connections: int = DEFAULT_GATEWAY_CONNECTIONS,
                 start_log: Path | None = None) -> None:
        self.registry = registry
        self.start_log = start_log
        self.ready_seen = False
        self.gateway_fd = gateway_fd
        self.gateway_connections = gateway_connections
        self.server_id = server_id
        self.command = command
        self.grace = grace
        self.launcher = Owner.of(os.getppid())
        self.launcher_gone = threading.Event()
        self.stop_reason: str | None = None

    def run(self) -> int:
        log_path = self.registry.log_path(self.server_id)
        with open(log_path, "ab", buffering=0) as log:
            proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=death_signal())
        with self.registry.locked():
            record = self.registry.get(self.server_id)
            if record is not None:
                record.pid = proc.pid
                self.registry.save(record)
        if record is None:
            self.stop_reason = "its registry record vanished before start"
        gateway = self._start_gateway(record)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._request_stop)
        threading.Thread(target=self._watch_stdin, daemon=True).start()
        self._log(f"supervisor {os.getpid()} started server pid {proc.pid}")
        started = time.time()
        self._note_start("start", served=record.served_name if record else None, kind=record.kind if record else None,
                         at=started)
        while self.stop_reason is None:
            if proc.poll() is not None:
                self._log(f"server exited with status {proc.returncode}")
                if gateway is not None:
                    gateway.close()
                with self.registry.locked():
                    self._note_ready(self.registry.get(self.server_id))
                    self.registry.remove(self.server_id)
                self._note_start("exit", after=round(time.time() - started, 2), status=proc.returncode)
                return 1
            self._check_owners()
            time.sleep(POLL_SECONDS)
        self._log(f"stopping server: {self.stop_reason}")
        self._mark_stopping()  # already marked when the decision came from _check_owners; a signal's is not
        if gateway is not None:
            gateway.close()
        kill_group(proc.pid, self.grace)
        proc.wait()
        with self.registry.locked():
            self._note_ready(self.registry.get(self.server_id))  # a stop may come before a poll saw "ready"
            self.registry.remove(self.server_id)
        self._log("server stopped")
        self._note_start("exit", after=round(time.time() - started, 2), status=0)
        return 0

    def _start_gateway(self, record: ServerRecord | None) -> Gateway | None:
        """The TCP port the launcher bound for us, if a person asked for one (see gateway.py)."""
        if self.gateway_fd is None:
            return None
        listener = socket.socket(fileno=self.gateway_fd)
        if record is None or record.socket is None:
            listener.close()
            return None
        gateway = Gateway(listener, record.socket, record.api_key, self.gateway_connections).start()
        self._log(f"gateway on 127.0.0.1:{gateway.port} (API key required on every route, "
                  f"at most {self.gateway_connections} connections at once)")
        return gateway

    def _request_stop(self, signum: int, _frame: object) -> None:
        self.stop_reason = f"signal {signal.Signals(signum).name}"

    def _mark_stopping(self) -> None:
        with self.registry.locked():
            record = self.registry.get(self.server_id)
            if record is not None and record.state != "stopping":
                record.state = "stopping"
                self.registry.save(record)

    def _watch_stdin(self) -> None:
        # The raw descriptor, not sys.stdin.buffer: a daemon thread blocked inside a BufferedReader holds its
        # lock, and the interpreter's shutdown then dies on it ("Fatal Python error: _enter_buffered_busy").
        while os.read(sys.stdin.fileno(), 4096):
            pass
        self.launcher_gone.set()

    def _check_owners(self) -> None:
        """Drop owners that are gone; start, cancel or finish the keep-alive countdown.

        The decision to stop and the "stopping" mark are one locked step: a manager looking for a server to
        reuse (under the same lock) either gets an owner in before the decision, or sees "stopping" and
        starts another server; it never gets an endpoint that is about to die."""
        with self.registry.locked():
            record = self.registry.get(self.server_id)
            if record is None:
                self.stop_reason = "its registry record was removed"
                return
            owners = [o for o in live_owners(record.owners)
                      if not (self.launcher_gone.is_set() and o.same_process(self.launcher))]
            now = time.time()
            idle_until = record.idle_until
            if owners:
                idle_until = None
            elif record.keep_alive == 0:
                self.stop_reason = "its last owner left"
            elif record.keep_alive > 0:
                idle_until = idle_until or now + record.keep_alive
                if now >= idle_until:
                    self.stop_reason = f"keep-alive of {record.keep_alive:g} s ran out"
            self._note_ready(record)
            state = "stopping" if self.stop_reason else record.state
            if owners != record.owners or idle_until != record.idle_until or state != record.state:
                record.owners, record.idle_until, record.state = owners, idle_until, state
                self.registry.save(record)

    def _note_ready(self, record: ServerRecord | None) -> None:
        """The launcher's measured time to ready, noted once (the launcher marks the record ready)."""
        if record is not None and record.ready_seconds is not None and not self.ready_seen:
            self.ready_seen = True
            self._note_start("ready", seconds=record.ready_seconds)

    def _note_start(self, event: str, **facts: object) -> None:
        """One JSON line in the start log, if one was asked for (SAGE_START_LOG): a run's every server start
        and its time to ready, whichever process launched it (the test suite prints them in its summary)."""
        if self.start_log is None:
            return
        with open(self.start_log, "a") as log:
            log.write(json.dumps({"event": event, "id": self.server_id, **facts}) + "\n")

    def _log(self, message: str) -> None:
        with open(self.registry.log_path(self.server_id), "a") as log:
            log.write(f"[sage_magic {time.strftime('%H:%M:%S')}] {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_magic.serving.supervisor")
    parser.add_argument("--runtime-dir", type=Path, required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--gateway-fd", type=int, default=None, help="listening TCP socket to serve the gateway on")
    parser.add_argument("--gateway-connections", type=int, default=DEFAULT_GATEWAY_CONNECTIONS,
                        help="connections the gateway serves at once; more get 503")
    parser.add_argument("--start-log", type=Path, default=None, help="append start/ready/exit lines (JSON) here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return Supervisor(Registry(args.runtime_dir), args.id, command, args.grace, args.gateway_fd,
                      args.gateway_connections, args.start_log).run()


if __name__ == "__main__":
    sys.exit(main())
