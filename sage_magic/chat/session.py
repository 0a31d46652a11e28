"""The kernel session: the one object every notebook face (``%%sage``, ``%sage_chat``, plain Python) shares.

It holds the per-process manager, the chat history, the leases on the servers it asked for, and what is
running now. It knows nothing of IPython, widgets or display: faces subscribe to its :class:`Event` stream
or pass per-call ``on_delta`` / ``on_progress`` callbacks, and render for themselves.

Why one object: a kernel has one conversation memory (``%%sage`` and the chat panel continue the same chat),
one set of servers it owns (released together on reset, stop or kernel exit), and one place to cancel
whatever is running from any thread (the panel's Stop button runs on a comm thread).

Leases are cached per serving key (the options that pick a server) and opened by one thread per key at a
time: a panel's worker and a ``%%sage`` cell asking at once share one lease instead of leaking the second. A
cached lease is released only once its replacement is held (a server whose last owner lets go stops, and a
cold start takes a minute), and the key never holds an API key in clear (reprs end up in logs and notebooks).

The transcript keeps every answered turn for export, interrupted ones included; :meth:`Session.current_replies`
is its part since the last reset, the conversation the model still remembers, which a new panel shows.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..core.config import Settings
from ..core.errors import Cancelled, NotFound, SageError
from ..core.progress import Progress, ProgressCallback, silent
from .events import Event
from .reply import Reply

if TYPE_CHECKING:
    from ..core.endpoint import Endpoint
    from ..serving.manager import Manager
    from .client import ChatClient

#: The chat options that pick a server: a lease is cached per combination (see :func:`_lease_key`).
_SERVING_OPTIONS = ("backend", "finetune_model", "merge", "model", "base_url", "api_key", "api_key_env",
                    "finetune_port", "vllm_arg", "publish_dir", "remote_root", "publish_as", "replace",
                    "unload_on_exit")
#: Keys the API key's digest in lease keys, so the digest cannot be looked up in a table of common keys.
_KEY_SALT = secrets.token_bytes(16)


def _lease_key(args: argparse.Namespace) -> tuple[str, ...]:
    """The lease cache key for these options: each serving option as text, the API key as a salted digest."""
    def part(name: str) -> str:
        value = getattr(args, name, None)
        if name == "api_key" and value is not None:
            return "key:" + hashlib.blake2b(str(value).encode(), key=_KEY_SALT, digest_size=8).hexdigest()
        return str(value)
    return tuple(part(name) for name in _SERVING_OPTIONS)


@dataclass
class _Running:
    cancel: threading.Event
    what: str
    started: float = field(default_factory=time.monotonic)


class Session:
    """One kernel's chat state. Thread-safe: asks may run on any thread, :meth:`cancel` works from any other."""

    def __init__(self, settings: Settings | None = None, *, search: Callable[..., list] | None = None,
                 max_history: int | None = None, system_prompt: str | None = None,
                 keep_alive: float | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.max_history = max_history
        self.system_prompt = system_prompt
        self.keep_alive = keep_alive
        self.history: list[dict[str, str]] = []  # what the model sees again: shared by every face
        self.transcript: list[dict[str, Any]] = []  # what `%sage export` writes: with citations and figures
        self.replies: list[Reply] = []  # the same turns as replies: `%sage rate|correct N` marks these
        self._search = search
        self._no_service = False
        self._manager: Manager | None = None
        self._leases: dict[tuple, Any] = {}
        self._stale: set[tuple] = set()  # leases to replace on next use (their fine-tune was trained again)
        self._opening: dict[tuple, threading.Lock] = {}  # one opener per lease key (see the module docstring)
        self._since_reset = 0  # where the conversation the model remembers starts in the transcript
        self._clients: dict[Endpoint, ChatClient] = {}
        self._windows: dict[Endpoint, int | None] = {}
        self._bases: dict[Endpoint, str | None] = {}
        self._running: dict[int, _Running] = {}
        self._started: set[str] = set()  # servers this session launched (`%sage stop` stops these by default)
        self._listeners: list[Callable[[Event], None]] = []
        self._prewarm_failed: dict[tuple, tuple[str, BaseException]] = {}  # lease key -> (what, its error)
        self._closing = threading.Event()  # ends background prewarms when the session closes
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # --- observing -----------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` with every :class:`Event` (from the thread that caused it); returns unsubscribe."""
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, kind: str, call: int, data: Any = None) -> None:
        event = Event(kind, call, data)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken face must not break the answer
                pass

    @property
    def running(self) -> dict[int, str]:
        """What is running now: call number → what it is doing."""
        with self._lock:
            return {call: r.what for call, r in self._running.items()}

    def cancel(self, call: int | None = None) -> int:
        """Stop one running call (or all): safe from any thread. Returns how many were asked to stop."""
        with self._lock:
            targets = [r for c, r in self._running.items() if call is None or c == call]
        for r in targets:
            r.cancel.set()
        return len(targets)

    # --- serving -------------------------------------------------------------------------------------------

    @property
    def manager(self) -> "Manager":
        if self._manager is None:
            from ..serving.manager import shared

            self._manager = shared(self.settings)
        return self._manager

    def options(self, **overrides: Any) -> argparse.Namespace:
        """The default chat options (the ones ``sage chat`` has), with keyword overrides."""
        from ..faces.options import option_parser  # the flags' defaults: one definition for every face

        args = option_parser(self.settings).parse_args([])
        for key, value in overrides.items():
            if not hasattr(args, key):
                raise SageError(f"Unknown chat option {key!r}. `%sage help` lists the options.")
            setattr(args, key, value)
        return args

    def lease(self, args: argparse.Namespace, *, progress: ProgressCallback = silent,
              cancel: threading.Event | None = None) -> Any:
        """A lease for these serving options: reused while its server lives, else opened (maybe started)."""
        if args.keep_alive is None and self.keep_alive is not None:
            args.keep_alive = self.keep_alive
        cancel = cancel or threading.Event()
        key = _lease_key(args)
        with self._opening_lock(key, cancel, progress):
            with self._lock:
                old = self._leases.get(key)
                stale = key in self._stale
                failed = self._prewarm_failed.pop(key, None)
            if failed is not None:
                what, error = failed
                raise SageError(f"Starting {what} in the background when sage_magic loaded (prewarm) failed: "
                                f"{error} Ask again to retry.") from None
            if old is not None and not stale:
                server = old.endpoint.server_id
                if server is None or self.manager.registry.get(server) is not None:
                    return old
            if args.index is not None:
                self._check_index(args.index)  # before a server starts for nothing
            from .backends import open_endpoint

            lease = open_endpoint(self.manager, args, progress=progress, cancel=cancel)
            if lease.listing:
                self.client(lease.endpoint).learn_window(lease.listing)
            with self._lock:
                self._leases[key] = lease
                self._stale.discard(key)
            if old is not None:
                self._let_go(old)  # only now: while it was held, its server could not stop under us
        if lease.endpoint.server_id is not None and not lease.endpoint.reused:
            self._started.add(lease.endpoint.server_id)
            self._emit("servers-changed", 0, lease.endpoint.server_id)
        return lease

    def forget_finetune(self, name: str) -> None:
        """Fine-tune ``name`` was just trained again: its cached leases are replaced on their next use, when
        the manager loads the new adapter into the same server in place instead of answering with the old one.

        They are not released here: when a session holds a server's only lease, releasing it stops the server
        (keep-alive 0), which would break an answer streaming now and make the next ask wait for a cold start.
        """
        with self._lock:
            self._stale.update(key for key in self._leases if key[0] in ("finetune", "openai") and key[1] == name)
        self.catalog_changed("finetunes")

    def catalog_changed(self, what: str) -> None:
        """The fine-tunes or indexes on disk changed (a training, an ``index add`` in a child process): faces
        that offer them to pick from (the panel) refresh their lists."""
        self._emit("catalog-changed", 0, what)

    def prewarm(self, options: Sequence[argparse.Namespace]) -> None:
        """Open leases for these options in the background (one thread each), so that the first question
        finds its server started or reused. A question asked meanwhile waits for the same opening (with a
        progress line saying so); a failure is kept and raised by the first :meth:`lease` of those options."""
        for args in options:
            threading.Thread(target=self._prewarm_one, args=(args,), daemon=True,
                             name=f"sage-prewarm-{args.finetune_model or args.model}").start()

    def _prewarm_one(self, args: argparse.Namespace) -> None:
        try:
            self.lease(args, cancel=self._closing)
        except Cancelled:
            pass  # the session closed first
        except BaseException as error:  # kept for the first ask of this model: a thread has nobody to tell
            with self._lock:
                self._prewarm_failed[_lease_key(args)] = (args.finetune_model or args.model or args.backend, error)

    @contextmanager
    def _opening_lock(self, key: tuple, cancel: threading.Event,
                      progress: ProgressCallback = silent) -> Iterator[None]:
        """Hold ``key``'s opener lock (not the session lock: opening may start a server for a minute); a
        ``cancel`` set while another thread opens ends the wait with :class:`Cancelled`."""
        with self._lock:
            lock = self._opening.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=False):
            progress(Progress("launch", "waiting for the server another call is starting (a prewarm, a panel "
                                        "or another cell)"))
            self._wait_for(lock, cancel)
        try:
            yield
        finally:
            lock.release()

    @staticmethod
    def _wait_for(lock: threading.Lock, cancel: threading.Event) -> None:
        while not lock.acquire(timeout=0.1):
            if cancel.is_set():
                raise Cancelled("Cancelled while another question started the same server; nothing was left "
                                "running on your account.")

    def _drop(self, key: tuple) -> None:
        with self._lock:
            lease = self._leases.pop(key, None)
            self._stale.discard(key)
        if lease is not None:
            self._let_go(lease)

    def _let_go(self, lease: Any) -> None:
        """Release a lease that is no longer cached, and its client unless a cached lease shares the endpoint."""
        with self._lock:
            shared = any(held.endpoint == lease.endpoint for held in self._leases.values())
            client = None if shared else self._clients.pop(lease.endpoint, None)
        if client is not None:
            client.close()
        lease.release()

    def _check_index(self, name: str) -> None:
        from ..rag import store

        if not store.index_exists(self.settings, name):
            store.read_manifest(self.settings, name)  # raises the engine's NotFound, listing the known ones
            raise NotFound(f"There is no index named {name!r}. `%sage indexes` lists them.")

    def client(self, endpoint: "Endpoint") -> "ChatClient":
        with self._lock:
            client = self._clients.get(endpoint)
            if client is None:
                from .client import ChatClient

                client = self._clients[endpoint] = ChatClient(endpoint)
            return client

    def max_model_len(self, endpoint: "Endpoint") -> int | None:
        """The served model's window, asked once per endpoint (the footer's "context used of N")."""
        if endpoint not in self._windows:
            self._windows[endpoint] = self.client(endpoint).max_model_len()
        return self._windows[endpoint]

    def search(self) -> Callable[..., list] | None:
        """The RAG helper process's search when that module exists, so no embedder loads into the kernel."""
        if self._search is None and not self._no_service:
            try:
                from ..rag.service import SearchService
            except ImportError:
                self._no_service = True  # asked once: a failed import is not cached by Python, and costs ms
                return None
            self._search = SearchService(self.settings).search
        return self._search

    # --- asking --------------------------------------------------------------------------------------------

    def ask(self, prompt: str, options: argparse.Namespace | None = None, *,
            on_delta: Callable[[str], None] | None = None, on_progress: ProgressCallback = silent,
            cancel: threading.Event | None = None, new_chat: bool = False) -> Reply:
        """Ask ``prompt`` with chat ``options`` (see :meth:`options`), continuing the session's chat.

        ``on_delta`` gets the text as it streams, ``on_progress`` the phases of a merge or server start. A set
        ``cancel`` (or :meth:`cancel` from another thread) stops it; the partial answer is returned, marked
        ``cancelled``, and stays in the history. A KeyboardInterrupt keeps it too (history and transcript) and
        propagates. Every call ends with one event: "finished", "cancelled", or "failed" with the error.
        """
        from .backends import ask_options
        from .client import StreamInterrupted
        from .conversation import Answer

        args = options or self.options()
        cancel = cancel or threading.Event()
        with self._call(cancel, f"ask {args.finetune_model or args.model or args.backend}", prompt) as call:
            lease = self.lease(args, progress=on_progress, cancel=cancel)
            if new_chat:
                self.reset()
            conversation = self._conversation(lease.endpoint, args.system, args.index is not None)

            def delta(text: str) -> None:
                if on_delta is not None:
                    on_delta(text)
                self._emit("delta", call, text)

            attached = args.backend == "openai" and not args.model  # a local fine-tune on a server not ours
            finetune = args.finetune_model if args.backend == "finetune" or attached else None
            try:
                answer = conversation.ask(prompt, **ask_options(args), on_delta=delta, cancel=cancel)
            except StreamInterrupted as interrupt:  # the partial answer is in the history: keep it for export too
                if interrupt.result.text:
                    partial = Answer(interrupt.result.text, interrupt.result,
                                     messages=getattr(interrupt, "messages", []))
                    interrupt.partial = self._reply(prompt, partial, lease.endpoint, ask_server=False,
                                                    finetune=finetune)
                    self._record(interrupt.partial)
                raise
            self._trim_history()
            reply = self._reply(prompt, answer, lease.endpoint, finetune=finetune)
        self._record(reply)
        self._emit("cancelled" if reply.cancelled else "finished", call, reply)
        return reply

    @contextmanager
    def _call(self, cancel: threading.Event, what: str, prompt: str) -> Iterator[int]:
        """One call of :meth:`ask` or :meth:`compare`, listed in :attr:`running` while it lasts. It announces
        "started" inside the guard, so that even an interrupt in a listener ends the call with its event: a
        KeyboardInterrupt as "cancelled" (with the partial reply it carries, if any), any other error as
        "failed". The caller emits the event of a normal end."""
        call = self._begin(cancel, what)
        try:
            self._emit("started", call, prompt)
            yield call
        except KeyboardInterrupt as interrupt:
            self._emit("cancelled", call, getattr(interrupt, "partial", None))
            raise
        except BaseException as error:
            self._emit("failed", call, error)
            raise
        finally:
            self._end(call)

    def _record(self, reply: Reply) -> None:
        with self._lock:
            self.transcript.append({"prompt": reply.prompt, "answer": reply.text, **reply.provenance()})
            self.replies.append(reply)

    def reply(self, number: int | None = None) -> Reply:
        """Answer ``number`` of this session (1 = the first, -1 = the last; default the last), or one
        paragraph saying which numbers there are."""
        with self._lock:
            replies = list(self.replies)
        if not replies:
            raise SageError("There is no answer to mark yet: ask with %%sage (or the chat panel) first.")
        index = -1 if number is None else number - 1 if number > 0 else number
        if number == 0 or not -len(replies) <= index < len(replies):
            raise SageError(f"There is no answer {number}: this session has {len(replies)} (1 to {len(replies)}, "
                            "or -1 for the last; `%sage feedback` lists the marked ones).")
        return replies[index]

    def mark(self, reply: Reply, *, rating: str | None = None, correction: str | None = None) -> dict[str, Any]:
        """Rate and/or correct ``reply`` in the feedback store, and tell the faces (a panel shows the mark)."""
        mark = reply.mark(rating=rating, correction=correction)
        self._emit("marked", 0, mark)
        return mark

    def current_replies(self) -> list[Reply]:
        """The answers since the last :meth:`reset`: the conversation the model still remembers (what a new
        panel shows, each answer still markable; the transcript itself keeps every turn for export)."""
        with self._lock:
            return self.replies[self._since_reset:]

    def compare(self, prompt: str, names: Sequence[str], options: argparse.Namespace | None = None, *,
                on_delta: Callable[[str, str], None] | None = None, on_progress: ProgressCallback = silent,
                on_tick: Callable[[], None] | None = None, cancel: threading.Event | None = None,
                tick: float = 0.05) -> list[Reply]:
        """Stream ``prompt`` to several fine-tunes of one base at once (``base`` = that base model).

        The comparison is one-off: it neither reads nor extends the session's history. ``on_delta(name,
        text)`` runs on worker threads; ``on_tick`` on the calling thread while it waits (see compare.py).
        """
        from .backends import ask_options
        from .compare import BASE, check_names, run_waves

        args = options or self.options()
        names, tunes = check_names(names)
        cancel = cancel or threading.Event()
        endpoints: dict[str, Endpoint] = {}
        for name in tunes:
            endpoints[name] = self.lease(argparse.Namespace(**{**vars(args), "backend": "finetune",
                                                               "finetune_model": name}),
                                         progress=on_progress, cancel=cancel).endpoint
        if BASE in names:
            endpoints[BASE] = self._base_of(endpoints[tunes[0]])

        def ask(name: str) -> Reply:
            endpoint = endpoints[name]
            answer = self._conversation(endpoint, args.system, args.index is not None, history=[]).ask(
                prompt, **ask_options(args), cancel=cancel,
                on_delta=(lambda text: on_delta(name, text)) if on_delta else None)
            return self._reply(prompt, answer, endpoint, markable=False)

        with self._call(cancel, "compare " + ",".join(names), prompt) as call:
            replies = run_waves(names, ask, cancel=cancel, on_tick=on_tick, tick=tick)
        self._emit("finished", call, replies)
        return replies

    def _base_of(self, endpoint: "Endpoint") -> "Endpoint":
        base = self._base_name(endpoint)
        if base is None:
            raise SageError(f"{endpoint.model} is not served on top of its base model (merged, or an outside "
                            "endpoint), so `base` cannot be compared with it. Drop --merge, or leave `base` out.")
        return endpoint.for_model(base)

    def _base_name(self, endpoint: "Endpoint") -> str | None:
        """The base model a LoRA adapter is served on (its ``parent`` in /v1/models), asked once per endpoint."""
        if endpoint not in self._bases:
            from ..core.http import HttpError, request_json

            try:
                models = request_json(f"{endpoint.base_url}/models", endpoint.api_key, socket=endpoint.socket) or {}
            except HttpError:
                models = {}
            entry = next((m for m in models.get("data", []) if m.get("id") == endpoint.model), {})
            parent = entry.get("parent")
            self._bases[endpoint] = parent if parent and parent != endpoint.model else None
        return self._bases[endpoint]

    def _conversation(self, endpoint: "Endpoint", system: str | None, grounded: bool,
                      history: list | None = None) -> Any:
        """A conversation on the session's history; ``grounded`` (an --index was given) gives it the session's
        search, so that a question without one never loads the RAG package into the kernel."""
        from .conversation import Conversation

        search = self.search() if grounded else None
        extra = {"search": search} if search is not None else {}
        conversation = Conversation(self.client(endpoint), self.settings,
                                    system_prompt=system or self.system_prompt, **extra)
        conversation.history = self.history if history is None else history
        return conversation

    def _trim_history(self) -> None:
        """Keep the last ``max_history`` exchanges (None: all; the engine trims further to fit the window)."""
        if self.max_history is not None:
            with self._lock:
                del self.history[:max(0, len(self.history) - 2 * self.max_history)]

    def _reply(self, prompt: str, answer: Any, endpoint: "Endpoint", ask_server: bool = True,
               finetune: str | None = None, markable: bool = True) -> Reply:
        """The reply with its figures; without ``ask_server`` (an interrupt, maybe of a hung server) the window
        and base are the ones already known, else left out. ``markable`` replies carry what a rating or a
        correction stores (a comparison's are not: their prompt never entered the conversation)."""
        s = answer.stream
        window = self.max_model_len(endpoint) if ask_server else self._windows.get(endpoint)
        used = (s.prompt_tokens or 0) + (s.completion_tokens or 0) if s.prompt_tokens is not None else None
        metrics = {
            "base": self._base_name(endpoint) if ask_server else self._bases.get(endpoint),
            "server": endpoint.server_id,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "ttft_s": None if s.time_to_first_token is None else round(s.time_to_first_token, 4),
            "tokens_per_s": None if s.tokens_per_second is None else round(s.tokens_per_second, 2),
            "elapsed_s": round(s.elapsed, 3),
            "context_used": used,
            "max_model_len": window,
            "finish_reason": s.finish_reason,
            "dropped_chunks": answer.dropped_chunks,
            "trimmed_turns": getattr(answer, "trimmed_turns", 0),
        }
        citations = [{"n": c.n, "source": c.source, "location": c.location, "score": round(c.score, 4),
                      "text": c.text}
                     for c in answer.citations]
        feedback = None
        if markable:
            feedback = {"turn": secrets.token_hex(8), "model": endpoint.model, "finetune": finetune,
                        "fingerprint": self._fingerprint(endpoint), "prompt": prompt, "answer": answer.text,
                        "messages": answer.messages, "citations": citations, "home": str(self.settings.home)}
        return Reply(answer.text, model=endpoint.model, prompt=prompt, citations=citations, metrics=metrics,
                     cancelled=answer.cancelled, feedback=feedback)

    def _fingerprint(self, endpoint: "Endpoint") -> str | None:
        """What identifies the weights that answered: the adapter's digest on a base server, the served
        model's identity otherwise (merged fine-tune, base); on a server sage_magic did not start, the digest
        of the fine-tune it put there, or None when it only asks that server's own model."""
        record = self.manager.registry.get(endpoint.server_id) if endpoint.server_id else None
        if record is None:
            return endpoint.fingerprint
        adapter = record.adapters.get(endpoint.model)
        return adapter["fingerprint"] if adapter else record.identity

    def _begin(self, cancel: threading.Event, what: str) -> int:
        call = next(self._ids)
        with self._lock:
            self._running[call] = _Running(cancel, what)
        return call

    def _end(self, call: int) -> None:
        with self._lock:
            self._running.pop(call, None)

    # --- management (the twins of `sage ps / stop / logs / finetune list / index list`) -------------------

    def servers(self) -> list:
        return self.manager.servers()

    def stop(self, target: str | None = None, *, everything: bool = False) -> tuple[list, list[str]]:
        """Stop servers, whoever owns them: ``target`` (id, prefix or served name), ``everything``, or by
        default the ones this session started. Returns (stopped records, ids of servers this session uses but
        did not start, which the default leaves running for whoever started them)."""
        if everything:
            stopped = self.manager.stop_all()
            spared: list[str] = []
        elif target is not None:
            stopped, spared = [self.manager.stop(target)], []
        else:
            with self._lock:
                used = {lease.endpoint.server_id for lease in self._leases.values() if lease.endpoint.server_id}
            # a server this session launched stays "started here" however many later leases reused it
            started = sorted(s for s in used if s in self._started)
            spared = sorted(s for s in used if s not in started)
            stopped = [self.manager.stop(s) for s in started if self.manager.registry.get(s) is not None]
        gone = {r.id for r in stopped}
        with self._lock:
            keys = [k for k, lease in self._leases.items() if lease.endpoint.server_id in gone]
        for key in keys:
            self._drop(key)
        if stopped:
            self._emit("servers-changed", 0, sorted(gone))
        return stopped, spared

    def logs(self, target: str | None = None, lines: int = 50) -> str:
        if target is None:
            current = [lease.endpoint.server_id for lease in self._leases.values() if lease.endpoint.server_id]
            if not current:
                raise SageError("This session uses no server yet: give a server id (`%sage status` lists them).")
            target = current[-1]
        return self.manager.logs(target, lines)

    def finetunes(self) -> list:
        from ..finetune.catalog import list_finetunes

        return list_finetunes(self.settings)

    def indexes(self) -> list:
        from ..rag.store import list_indexes

        return list_indexes(self.settings)

    def reset(self) -> None:
        """Forget the conversation: the transcript for export keeps what was said, :meth:`current_replies`
        and so a new panel start after it."""
        with self._lock:
            self.history.clear()
            self._since_reset = len(self.transcript)

    def export(self, path: str | Path) -> Path:
        """Write the transcript with citations and figures as Markdown (.md) or JSON (.json)."""
        from .transcript import export

        return export(self.transcript, path)

    def close(self) -> None:
        """Stop everything running and leave every server this session holds (they stop after keep-alive)."""
        self._closing.set()
        self.cancel()
        with self._lock:
            keys = list(self._leases)
        for key in keys:
            self._drop(key)
        if self._search is not None and hasattr(getattr(self._search, "__self__", None), "close"):
            self._search.__self__.close()


