"""Attaching a local fine-tune to a vLLM server sage_magic did not start (``--backend openai --finetune-model``).

Two ways to put the adapter there: publish it into the folder the server's LoRA filesystem resolver reads
(finetune/publish.py; the server loads it on the first request for its name), or ask the server to load it
(``POST /v1/load_lora_adapter``, with the adapter's path as the server sees it). Either way the identity is
then checked as strictly as for our own servers: ``/v1/models`` must list the adapter under the expected
name, from the expected path, on a base that is the fine-tune's base. A same-named adapter that is another
one (a colleague's) is an :class:`AdapterConflict`, never used silently.

The server is never stopped from here. The lease unloads the adapter on release (the session's close, the
end of ``sage chat``, the interpreter's exit) only with ``--unload-on-exit`` and only if this process loaded
it; an adapter that was already there stays for whoever loaded it.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ..core.config import Settings
from ..core.endpoint import Endpoint
from ..core.errors import (
    AdapterConflict,
    IncompatibleAdapter,
    NoLoraSupport,
    RemoteServerError,
    ResolverBlind,
    Unauthorized,
    Unreachable,
)
from ..core.http import HttpError, request_json, request_text
from ..finetune.catalog import FineTune, get_finetune
from .leases import Lease

#: Loading an adapter may read it from a network mount: longer than a status check.
LOAD_TIMEOUT = 120.0


@dataclass(frozen=True)
class AttachOptions:
    """How a fine-tune gets onto the server: ``publish_dir`` (shared storage) or runtime loading, where
    ``remote_root`` is SAGE_HOME as the server mounts it (None: the same path, the same machine)."""

    publish_dir: Path | None = None
    remote_root: str | None = None
    publish_as: str | None = None
    replace: bool = False
    unload_on_exit: bool = False


@dataclass(frozen=True)
class Attached:
    """A fine-tune answering on a server not ours: the endpoint to ask, and whether this process put it there
    (only then may it unload it)."""

    endpoint: Endpoint
    loaded_here: bool


def attach_lease(settings: Settings, server: Endpoint, name: str, options: AttachOptions) -> Lease:
    """A lease on fine-tune ``name`` at ``server``: releasing it unloads the adapter when asked to and ours."""
    attached = attach(settings, server, name, options)
    if not (options.unload_on_exit and attached.loaded_here):
        return Lease.unmanaged(attached.endpoint)
    lease = Lease(attached.endpoint, f"remote:{attached.endpoint.model}", lambda _id: _unload_now(lease))
    with _pending_lock:
        _pending.append(lease)
    return lease


def attach(settings: Settings, server: Endpoint, name: str, options: AttachOptions) -> Attached:
    """Make fine-tune ``name`` answer at ``server`` (see the module docstring) and check that it does."""
    from ..core.fingerprint import adapter_digest
    from ..finetune.publish import published_name

    ft = get_finetune(settings, name)
    fingerprint = adapter_digest(ft.adapter_dir)
    models = list_models(server)
    base = _matching_base(models, ft, settings, options.remote_root, server)
    served = published_name(ft, options.publish_as)
    listed = _entry(models, served)
    if options.publish_dir is not None:
        loaded_here = _publish(ft, server, base, served, listed, options, fingerprint)
        expected = None
    else:
        expected = remote_path(ft.adapter_dir, settings.home, options.remote_root)
        loaded_here = _load(server, served, expected, listed, options.replace, fingerprint)
    try:
        _check_listed(server, served, base["id"], expected, fingerprint)
    except RemoteServerError:
        if loaded_here:  # not usable as ours: leave the server as it was
            _unload(server.for_model(served))
        raise
    return Attached(replace(server.for_model(served), fingerprint=fingerprint), loaded_here)


def remote_path(local: Path, home: Path, remote_root: str | None) -> str:
    """``local`` (under SAGE_HOME) as the server sees it: SAGE_HOME replaced by ``remote_root``."""
    if remote_root is None:
        return str(local)
    try:
        relative = local.resolve().relative_to(home.resolve())
    except ValueError:
        raise RemoteServerError(f"{local} is not under SAGE_HOME ({home}), so --remote-root cannot map it onto "
                                "the server's mount. Keep the fine-tune under SAGE_HOME, or publish it with "
                                "--publish-dir instead.") from None
    return str(PurePosixPath(remote_root) / relative.as_posix())


def list_models(server: Endpoint) -> list[dict[str, Any]]:
    """The server's /v1/models entries, or one paragraph saying why it could not be asked."""
    try:
        answer = request_json(f"{server.base_url}/models", server.api_key, timeout=15.0)
    except HttpError as error:
        raise _explained(error, server) from None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise Unreachable(f"{server.base_url}/models did not answer as an OpenAI-compatible server would (no model "
                          "list). Check --base-url: it ends in /v1, e.g. http://host:8000/v1.")
    return [m for m in data if isinstance(m, dict)]


def _explained(error: HttpError, server: Endpoint) -> RemoteServerError:
    if error.status is None:
        return Unreachable(f"Nothing answers at {server.base_url} ({error.body}). Check --base-url (host, port, "
                           "and the /v1 at the end), that the server runs, and that it listens on an address "
                           "this machine can reach (vLLM's --host; a firewall).")
    if error.status in (401, 403):
        return Unauthorized(f"{server.base_url} refused the API key (HTTP {error.status}). Put the key the server "
                            "was started with (its --api-key or VLLM_API_KEY) in an environment variable and pass "
                            "--api-key-env NAME (default OPENAI_API_KEY), then ask again.")
    return RemoteServerError(f"{server.base_url} answered HTTP {error.status}: {error.body[:300]}. Check --base-url "
                             "(it ends in /v1).")


def _entry(models: list[dict[str, Any]], model_id: str) -> dict[str, Any] | None:
    return next((m for m in models if m.get("id") == model_id), None)


def _matching_base(models: list[dict[str, Any]], ft: FineTune, settings: Settings, remote_root: str | None,
                   server: Endpoint) -> dict[str, Any]:
    """The server's base model that is the fine-tune's base: the same path (as the server sees it), the same
    name, or a folder of the same name."""
    names = {str(ft.base_path), ft.base_ref, ft.base_path.name}
    if ft.adapter_base_ref:
        names.add(ft.adapter_base_ref)
    if remote_root is not None:
        try:
            names.add(remote_path(ft.base_path, settings.home, remote_root))
        except RemoteServerError:
            pass  # a base outside SAGE_HOME: matched by name only
    bases = [m for m in models if not m.get("parent") or m.get("parent") == m.get("id")]
    for base in bases:
        root = str(base.get("root") or "")
        if base.get("id") in names or root in names or PurePosixPath(root).name == ft.base_path.name:
            return base
    served = ", ".join(f"{b.get('id')} ({b.get('root')})" for b in bases) or "no base model"
    raise IncompatibleAdapter(f"{server.base_url} serves {served}, but fine-tune {ft.name!r} was trained on "
                              f"{ft.base_ref} ({ft.base_path}). An adapter only fits its own base: ask a server "
                              f"that serves {ft.base_path.name}.")


def _publish(ft: FineTune, server: Endpoint, base: dict[str, Any], served: str, listed: dict[str, Any] | None,
             options: AttachOptions, fingerprint: str) -> bool:
    """Publish, then make the server resolve the name; True if this process made the server load it."""
    from ..finetune.publish import publish

    assert options.publish_dir is not None
    if listed is not None and not _published_there(listed, served) and not _is_ours(listed, set(), fingerprint):
        raise _conflict(served, listed, "publish")
    published = publish(ft, options.publish_dir, server_base=str(base.get("root") or base["id"]), name=served,
                        replace=options.replace)
    if listed is not None and published.copied:
        # the server keeps what it loaded under this name and never rereads the folder: reload it in place
        _post(server, "load_lora_adapter", {"lora_name": served, "lora_path": listed.get("root"),
                                            "load_inplace": True}, served)
        return False
    if listed is not None:
        return False
    try:
        request_json(f"{server.base_url}/chat/completions", server.api_key, timeout=LOAD_TIMEOUT,
                     payload={"model": served, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    except HttpError as error:
        if error.status == 404:
            raise ResolverBlind(
                f"The server did not find {served!r} although it was published to {published.path}. Its LoRA "
                f"filesystem resolver must read that folder: start the server with VLLM_PLUGINS="
                f"lora_filesystem_resolver, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and VLLM_LORA_RESOLVER_CACHE_DIR "
                f"set to {options.publish_dir} as the server mounts it (and --model exactly "
                f"{published.base}, which the resolver compares with the adapter's base).") from None
        if error.status == 400:
            raise NoLoraSupport(
                f"The server found {served!r} but could not load it ({error.body[:200]}). Start it with "
                f"--enable-lora and --max-lora-rank {ft.rank} or more.") from None
        raise _explained(error, server) from None
    return True


def _load(server: Endpoint, served: str, path: str, listed: dict[str, Any] | None, replace: bool,
          fingerprint: str) -> bool:
    """Load the adapter at runtime unless the server already has this one; True if this process loaded it."""
    if listed is not None and _is_ours(listed, {path}, fingerprint):
        return False  # already there: loaded (or published) earlier, by us or a colleague, the very same adapter
    if listed is not None and not replace:
        raise _conflict(served, listed, "load")
    _post(server, "load_lora_adapter", {"lora_name": served, "lora_path": path, "load_inplace": listed is not None},
          served)
    return listed is None


def _published_there(entry: dict[str, Any], served: str) -> bool:
    """Loaded by the resolver from a publish folder: from a folder named like the model (``DIR/NAME``)."""
    return PurePosixPath(str(entry.get("root") or "")).name == served


def _is_ours(entry: dict[str, Any], paths: set[str], fingerprint: str) -> bool:
    """Whether a listed adapter is this fine-tune: loaded from one of ``paths``, or (when the server's path is
    visible here) from a folder whose publish marker or own files carry its fingerprint."""
    from ..core.fingerprint import adapter_digest
    from ..finetune.publish import read_marker

    root = str(entry.get("root") or "")
    if root in paths:
        return True
    folder = Path(root)
    if not root or not folder.is_dir():
        return False
    marker = read_marker(folder)
    return (marker or {}).get("fingerprint") == fingerprint or adapter_digest(folder) == fingerprint


def _conflict(served: str, entry: dict[str, Any], how: str) -> AdapterConflict:
    return AdapterConflict(
        f"The server already serves an adapter named {served!r} from {entry.get('root')} that is not this "
        f"fine-tune (a colleague's?), so sage_magic will not answer with it. {how.capitalize()} yours under another "
        f"name with --publish-as OTHER_NAME, or replace it with --replace (whoever uses {served!r} then gets yours).")


def _post(server: Endpoint, route: str, payload: dict[str, Any], served: str) -> None:
    """POST to vLLM's adapter routes (they answer 200 with plain text, errors as JSON)."""
    try:
        request_text(f"{server.base_url}/{route}", server.api_key, payload, timeout=LOAD_TIMEOUT)
    except HttpError as error:
        if error.status == 404 and '"detail"' in error.body:  # the route itself is missing
            raise NoLoraSupport(
                f"{server.base_url} cannot load adapters at runtime (no /v1/{route}). Start the server with "
                f"--enable-lora and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or publish to "
                f"the folder its LoRA filesystem resolver reads with --publish-dir DIR.") from None
        if error.status is not None and error.status >= 400 and error.status not in (401, 403):
            raise NoLoraSupport(
                f"The server could not load {served!r} from {payload.get('lora_path')} ({error.body[:200]}). The "
                "path must exist as the server sees it (--remote-root PREFIX maps SAGE_HOME onto the server's "
                "mount), and the server needs --enable-lora with a --max-lora-rank at least the adapter's rank."
            ) from None
        raise _explained(error, server) from None


def _check_listed(server: Endpoint, served: str, base_id: str, path: str | None, fingerprint: str) -> None:
    """/v1/models lists ``served`` on ``base_id``, loaded from ``path`` (runtime loading) or from a publish
    folder of that name (``path`` None), or from wherever a marker proves it is this adapter."""
    entry = _entry(list_models(server), served)
    if entry is None:
        raise RemoteServerError(f"The server took {served!r} but /v1/models does not list it: another process may "
                                "have unloaded it meanwhile. Ask again.")
    where = str(entry.get("root") or "")
    expected = _is_ours(entry, {path} if path else set(), fingerprint) or (path is None and
                                                                         _published_there(entry, served))
    if not expected or entry.get("parent") != base_id:
        raise AdapterConflict(f"The server lists {served!r} from {where} on {entry.get('parent')}, not the adapter "
                              f"sage_magic gave it ({path or served} on {base_id}). Use another name with "
                              "--publish-as OTHER_NAME, or --replace.")


# --- unloading on exit ------------------------------------------------------------------------------------

_pending: list[Lease] = []
_pending_lock = threading.Lock()


def _unload_now(lease: Lease) -> None:
    """The release of a lease that unloads its adapter."""
    with _pending_lock:
        if lease in _pending:
            _pending.remove(lease)
    _unload(lease.endpoint)


def _unload(endpoint: Endpoint) -> None:
    """Unload the endpoint's adapter: a server already gone or a network down is no reason to fail an exit."""
    try:
        request_text(f"{endpoint.base_url}/unload_lora_adapter", endpoint.api_key, {"lora_name": endpoint.model},
                     timeout=15.0)
    except HttpError:
        pass


@atexit.register
def _unload_pending() -> None:
    """The interpreter exits (a kernel shut down, a script ended) with leases never released."""
    with _pending_lock:
        leases = list(_pending)
    for lease in leases:
        lease.release()
