"""Which endpoint a chat talks to, and what each question asks of it, from parsed chat options.

The options are the ones faces/options.py defines (``sage chat``'s flags, read as attributes): a fine-tune
served by the manager, a local model folder, an outside OpenAI-compatible server, or a local fine-tune put
onto such a server (serving/remote.py). Every face (the CLI, the session the notebook shares) goes through
these, so a flag means the same thing everywhere.
"""

from __future__ import annotations

import argparse
import os
import shlex
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..core.config import Settings
from ..core.endpoint import Endpoint
from ..core.errors import SageError
from ..core.progress import ProgressCallback, silent
from ..serving.leases import Lease
from ..serving.manager import Manager

if TYPE_CHECKING:
    from ..serving.remote import AttachOptions

#: Where an outside endpoint's key is read when neither --api-key nor --api-key-env is given (as the openai
#: client does).
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


def open_endpoint(manager: Manager, args: argparse.Namespace, *, progress: ProgressCallback = silent,
                  cancel: threading.Event | None = None) -> Lease:
    """Turn parsed serving options into a lease, starting or reusing a server as needed. The caller
    releases it (for ``--backend openai`` releasing does nothing: that endpoint is not ours)."""
    extra = tuple(a for chunk in args.vllm_arg for a in shlex.split(chunk))
    common = dict(port=args.finetune_port, extra_args=extra, keep_alive=args.keep_alive, progress=progress,
                  cancel=cancel)
    if args.backend == "finetune":
        if not args.finetune_model:
            raise SageError("Say which fine-tune to use: --finetune-model NAME (or set SAGE_DEBUG_FINETUNE_MODEL). "
                            "`sage finetune list` shows the names.")
        return manager.serve_finetune(args.finetune_model, merge=args.merge, **common)
    if args.backend == "vllm":
        if not args.model:
            raise SageError("--backend vllm needs --model PATH: the folder of a local model to serve.")
        return manager.serve_model(args.model, **common)
    if not args.base_url or not (args.model or args.finetune_model):
        raise SageError("--backend openai needs --base-url URL (e.g. http://host:8000/v1) and --model NAME (a model "
                        "it serves) or --finetune-model NAME (a local fine-tune to put there); add --api-key-env "
                        "NAME if the endpoint wants a key.")
    server = Endpoint(args.base_url.rstrip("/"), api_key(args), args.model or "")
    if args.model:
        return Lease.unmanaged(server)
    from ..serving.remote import attach_lease  # loaded for this backend only: a first question skips it

    return attach_lease(manager.settings, server, args.finetune_model, attach_options(args, manager.settings))


def attach_options(args: argparse.Namespace, settings: Settings) -> AttachOptions:
    """How --finetune-model reaches a server not ours: --publish-dir (else SAGE_PUBLISH_DIR) or runtime loading."""
    from ..serving.remote import AttachOptions

    publish_dir = args.publish_dir or settings.publish_dir
    return AttachOptions(publish_dir=Path(publish_dir).expanduser() if publish_dir else None,
                         remote_root=args.remote_root, publish_as=getattr(args, "publish_as", None),
                         replace=args.replace, unload_on_exit=args.unload_on_exit)


def remote_endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The --base-url endpoint that openai:MODEL entries are asked at (None when not given)."""
    return Endpoint(args.base_url.rstrip("/"), api_key(args)) if args.base_url else None


def api_key(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str | None:
    """An outside endpoint's key: --api-key, else the variable --api-key-env names (which must be set), else
    OPENAI_API_KEY when set, else none (a local vLLM started without a key wants none)."""
    if args.api_key:
        return str(args.api_key)
    name = args.api_key_env
    if name is None:
        return environ.get(DEFAULT_API_KEY_ENV) or None
    if not environ.get(name):
        raise SageError(f"--api-key-env {name}: there is no environment variable {name} (or it is empty) in this "
                        f"process. Set it where Jupyter or the shell starts (export {name}=...), then restart the "
                        "kernel; or name the variable that holds the key.")
    return environ[name]


def ask_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``Conversation.ask`` that the chat options above give (every face)."""
    return dict(index=args.index, top_k=args.top_k, mode=args.mode, max_tokens=args.max_tokens,
                temperature=args.temperature, seed=args.seed, extra=dict(args.params))
