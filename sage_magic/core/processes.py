"""Process control for the servers we start, in one place: is a pid still ours, and how to stop it.

The registry holds data only; the manager, the supervisor and the registry's reaper all signal processes
through these functions. Every signal first checks that the pid still runs a process of that server (the
launcher marks the whole tree with SAGE_SERVER_ID), so a recycled pid is never signalled.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import time
from collections.abc import Callable

import psutil


def death_signal() -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when the thread that forked it exits: a child
    of ours (vLLM, a training or search helper) must not outlive a parent that died without running any code.

    Everything is looked up here, in the parent: between fork and exec in a threaded process (a notebook
    kernel) only the forking thread exists, so an import or a ``dlopen`` there can wait forever on a lock
    another thread held at the fork. The returned function only makes the ``prctl`` call.
    """
    prctl, sigterm = _prctl(), int(signal.SIGTERM)
    if prctl is None:
        return _nothing

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)

    return preexec


def die_with_parent() -> None:
    """The same death signal, set by a child first thing in its main (while it is still single-threaded)."""
    death_signal()()


_PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None where there is none (not Linux: the death pipe, EOF on stdin, still ends every
    child of ours)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _nothing() -> None:
    """The preexec function where prctl does not exist."""


#: How long an empty environment is read again before its process counts as not ours (see is_ours).
EXEC_GAP = 1.0


def is_ours(pid: int | None, server_id: str) -> bool:
    """True when ``pid`` still runs a process of server ``server_id`` (its supervisor or vLLM), not a
    stranger that got a recycled pid: the launcher marks them all with SAGE_SERVER_ID in the environment.

    An empty environment is read again for up to :data:`EXEC_GAP` seconds. Linux swaps in a new program
    (and lets Popen return) before it sets up that program's environment, and /proc/PID/environ reads
    empty in between: a supervisor just spawned, or a serving interpreter that is a wrapper exec'ing the
    real one (a pyenv shim), sits in that gap for a moment, and was taken for dead ("The supervisor
    process ... exited after 0 s", once in CI). Only a stranger with no environment at all pays the wait."""
    if not pid:
        return False
    deadline = time.monotonic() + EXEC_GAP
    try:
        proc = psutil.Process(pid)
        while True:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            env = proc.environ()
            if env or time.monotonic() >= deadline:
                return env.get("SAGE_SERVER_ID") == server_id
            time.sleep(0.005)
    except psutil.Error:
        return False


def watch(pid: int | None, server_id: str) -> psutil.Process | None:
    """A handle on a process of server ``server_id`` (checked as :func:`is_ours` does), or None. Ask
    :func:`still_running` of it later: that reads only /proc/PID/stat, not the environment again."""
    if not is_ours(pid, server_id):
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def still_running(proc: psutil.Process) -> bool:
    """The very process a handle was taken on still runs: same pid and start time (a recycled pid is
    another process), and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate_and_wait(pid: int, server_id: str, timeout: float) -> None:
    """SIGTERM a supervisor of ours and wait for it: it stops its server, removes the record, then exits."""
    if not is_ours(pid, server_id):
        return
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout=max(0.1, timeout))
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


def wait_gone(pid: int, server_id: str, timeout: float) -> None:
    """Wait (at most ``timeout``) for a process of server ``server_id`` to exit; one already gone (or a
    stranger that got its pid since) returns at once."""
    if not is_ours(pid, server_id):
        return
    try:
        psutil.Process(pid).wait(timeout=max(0.1, timeout))
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


def kill_group(leader: int, grace: float) -> None:
    """Stop a server tree: SIGTERM the leader (vLLM then shuts its engine down cleanly), then the whole
    process group, then SIGKILL what is left after the grace period."""

    def group_alive() -> bool:
        try:
            os.killpg(leader, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a zombie leader keeps the group id alive; look at the members instead
        return any(p.info["pid"] != leader or p.info["status"] != psutil.STATUS_ZOMBIE
                   for p in psutil.process_iter(["pid", "status"]) if _pgid(p.info["pid"]) == leader)

    def wait(deadline: float) -> bool:
        while time.monotonic() < deadline:
            if not group_alive():
                return True
            time.sleep(0.1)
        return not group_alive()

    for step, sig in enumerate((signal.SIGTERM, signal.SIGTERM, signal.SIGKILL)):
        try:
            if step == 0:
                os.kill(leader, sig)
            else:
                os.killpg(leader, sig)
        except ProcessLookupError:
            pass
        if wait(time.monotonic() + (grace / 2 if step < 2 else 5.0)):
            return


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, at once. The tree is read before the kill, since orphans
    are handed to init; needed where children left the leader's process group (torchrun starts each training
    process in a session of its own)."""
    try:
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
