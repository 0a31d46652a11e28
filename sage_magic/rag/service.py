"""Searching indexes from a light process: the work runs in a helper process kept warm (see worker.py).

``SearchService(settings).search(index, query, top_k, mode)`` gives the same hits as ``rag.search`` but the
calling process never imports torch, sentence-transformers or FAISS: a notebook kernel stays small and fast
to start, and a crash in native code ends the helper, not the kernel.

The helper starts on first use and then keeps the model and the opened indexes in memory. Calls are
thread-safe and may overlap (each request carries an id; one reader thread hands each answer to its
caller). Validation errors come back as the same SageError (class and text) that ``rag.search`` raises. If
the helper dies during a call, that call raises a SageError with the helper's last words, and the next call
starts a new helper; if it died while idle, the next call simply starts a new one. ``close()`` stops it, and
so does the exit of this process: the helper watches its stdin (the death pipe) and has PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import errors
from ..core.config import Settings
from ..core.errors import SageError
from .search import Hit, check_request

#: How long one answer may take. The first search of a helper loads the embedding model (seconds, up to a
#: minute on a loaded laptop); no single search takes anywhere near this.
ANSWER_TIMEOUT = 300.0
#: How long a closing helper gets to exit on its own after its stdin closes, before it is killed.
STOP_GRACE = 2.0
#: The source checkout this module comes from, if it is one (not site-packages): put first on the helper's
#: PYTHONPATH so that it runs the same code, and speaks the same protocol, as its parent.
_CHECKOUT = Path(__file__).resolve().parent.parent.parent
_SOURCE_ROOT = str(_CHECKOUT) if (_CHECKOUT / "pyproject.toml").is_file() else None


@dataclass
class _Call:
    """One request waiting for its answer (None when the helper ended first)."""

    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None


class _Helper:
    """One helper process and the thread that started it and reads its answers.

    The reader thread is also the one that starts the process, on purpose: PR_SET_PDEATHSIG fires when the
    *thread* that created a process exits, and this thread lives exactly as long as the helper does. A call
    made from a short-lived thread (a thread pool, a widget callback) therefore does not kill the helper
    when that thread ends.
    """

    def __init__(self, python: str) -> None:
        self.python = python
        self.pending: dict[int, _Call] = {}
        self.lock = threading.Lock()  # guards pending and ended
        self.write_lock = threading.Lock()
        self.ended: str | None = None  # why the helper is gone, once it is
        self.closing = False
        self.stderr: deque[str] = deque(maxlen=20)
        self.process: subprocess.Popen[bytes] | None = None
        started = threading.Event()
        self.reader = threading.Thread(target=self._run, args=(started,), daemon=True, name="sage-rag-helper")
        self.reader.start()
        started.wait()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _run(self, started: threading.Event) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (_SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)}
        try:
            self.process = subprocess.Popen(
                [self.python, "-m", "sage_magic.rag.worker", "--parent", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                start_new_session=True,  # "Interrupt kernel" signals the kernel's process group, not the helper
            )
        except OSError as error:
            self._end(f"could not be started with {self.python} ({error})")
            return
        finally:
            started.set()
        drain = threading.Thread(target=self._drain_stderr, daemon=True, name="sage-rag-helper-stderr")
        drain.start()
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                continue  # not ours (the protocol has its own fd; see worker.py)
            with self.lock:
                call = self.pending.pop(answer.get("id"), None)
            if call is not None:
                call.answer = answer
                call.done.set()
        status = self.process.wait()
        drain.join(timeout=1.0)  # so the last words are in
        if self.closing:
            self._end("was closed")
        elif status < 0:
            self._end(f"was killed by {signal.Signals(-status).name}")
        else:
            self._end(f"exited with status {status}")

    def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self.stderr.append(line)

    def _end(self, why: str) -> None:
        with self.lock:
            self.ended = why
            calls, self.pending = list(self.pending.values()), {}
        for call in calls:
            call.done.set()

    def submit(self, request_id: int, request: dict[str, Any]) -> _Call | None:
        """Send a request; None when the helper was already gone (nothing was asked: a new one may be)."""
        call = _Call()
        with self.lock:
            if self.ended is not None:
                return None
            self.pending[request_id] = call
        line = (json.dumps({"id": request_id, **request}) + "\n").encode()
        try:
            with self.write_lock:
                assert self.process is not None and self.process.stdin is not None
                self.process.stdin.write(line)
                self.process.stdin.flush()
        except (OSError, ValueError):  # a closed pipe: it died before reading this
            with self.lock:
                self.pending.pop(request_id, None)
            return None
        return call

    def forget(self, request_id: int) -> None:
        with self.lock:
            self.pending.pop(request_id, None)

    def last_words(self) -> str:
        lines = list(self.stderr)[-3:]
        return " / ".join(lines) if lines else "nothing on stderr"

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Close the death pipe (the helper exits by itself), then kill it if it has not after ``grace`` s."""
        self.closing = True
        process = self.process
        if process is None:
            return
        try:
            with self.write_lock:
                if process.stdin is not None:
                    process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.reader.join(timeout=grace)


class _Slot:
    """The service's current helper, kept apart from the service so a finalizer can stop it."""

    def __init__(self) -> None:
        self.helper: _Helper | None = None
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            helper, self.helper = self.helper, None
        if helper is not None:
            helper.stop()


class SearchService:
    """``rag.search`` through a warm helper process; one per kernel (or face) is enough."""

    def __init__(self, settings: Settings, timeout: float = ANSWER_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._slot = _Slot()
        self._ids = itertools.count(1)
        # Stops the helper when the service is collected and at interpreter exit (atexit), whichever is first.
        self._finalizer = weakref.finalize(self, self._slot.close)

    @property
    def pid(self) -> int | None:
        """The helper's pid while one runs (for status displays and tests), else None."""
        helper = self._slot.helper
        return helper.pid if helper is not None and helper.ended is None else None

    def search(self, index: str, query: str, top_k: int = 4, mode: str = "hybrid") -> list[Hit]:
        """The same hits as ``rag.search(settings, index, query, top_k, mode)``, found by the helper."""
        check_request(query, top_k, mode)  # before anything starts: same message as rag.search
        answer = self._ask({"op": "search", "index": index, "query": query, "top_k": top_k, "mode": mode})
        return [Hit(**hit) for hit in answer["hits"]]

    def warm(self, index: str | None = None) -> int:
        """Start the helper and load the embedding model (and open ``index``) now, so that the first search
        answers at full speed; returns the helper's pid."""
        return int(self._ask({"op": "warm", "index": index})["pid"])

    def close(self) -> None:
        """Stop the helper (a later search starts a new one)."""
        self._slot.close()

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        settings = self.settings
        request["settings"] = {"home": str(settings.home), "runtime_dir": str(settings.runtime_dir),
                               "embedder": settings.embedder, "embed_backend": settings.embed_backend}
        for _ in range(2):  # a helper found dead before it got the request is replaced once
            helper = self._helper()
            request_id = next(self._ids)
            call = helper.submit(request_id, request)
            if call is not None:
                break
            self._discard(helper)
        else:
            raise SageError(
                f"The search helper process {helper.ended or 'stopped'} twice before it could take a request; "
                f"its last words: {helper.last_words()}. Check that {helper.python} can run "
                "`python -m sage_magic.rag.worker` (SAGE_PYTHON names that interpreter)."
            )
        try:
            if not call.done.wait(self.timeout):
                self._discard(helper)
                raise SageError(
                    f"The search helper process did not answer within {self.timeout:g} s, so it was stopped. "
                    "The next search starts a new one; if this repeats, try `sage index query` in a terminal."
                )
        finally:
            helper.forget(request_id)
        answer = call.answer
        if answer is None:
            self._discard(helper)
            raise SageError(
                f"The search helper process (pid {helper.pid}, {helper.python} -m sage_magic.rag.worker) "
                f"{helper.ended} while searching; its last words: {helper.last_words()}. The next search starts "
                "a new one; if it fails again, run the same search with `sage index query` in a terminal to see "
                "the whole error (SAGE_PYTHON chooses the interpreter)."
            )
        if "error" in answer:
            raise _error(answer["error"])
        return answer

    def _helper(self) -> _Helper:
        """The running helper, started now if there is none or it has ended."""
        with self._slot.lock:
            helper = self._slot.helper
            if helper is None or helper.ended is not None:
                helper = self._slot.helper = _Helper(self.settings.python)
            return helper

    def _discard(self, helper: _Helper) -> None:
        """Stop ``helper`` and forget it, unless another call already replaced it."""
        with self._slot.lock:
            if self._slot.helper is helper:
                self._slot.helper = None
        helper.stop(grace=0)


def _error(error: dict[str, Any]) -> Exception:
    """The exception the helper's answer describes: the same SageError class and text as in-process."""
    kind = getattr(errors, error.get("type") or "", None)
    if isinstance(kind, type) and issubclass(kind, SageError):
        return kind(error["message"])
    return RuntimeError(f"The search helper process failed (a bug in sage_magic):\n{error['message']}")
