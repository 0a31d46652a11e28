"""One definition of the chat and serving options, for every face.

The ``sage chat`` command and the notebook magics parse the same flags (SAGE's names: ``--backend``,
``--finetune-model``, ``--finetune-port``, ``--index``, ``--top-k``) with the parser built here, and turn
them into a lease on an endpoint with :func:`open_endpoint`. Defaults of ``--backend`` and ``--finetune-model`` come
from SAGE_DEBUG_BACKEND and SAGE_DEBUG_FINETUNE_MODEL through :class:`Settings`.
"""

from __future__ import annotations

import argparse
import shlex
import threading

from .config import Settings, parse_duration
from .conversation import DEFAULT_INDEX
from .endpoint import Endpoint
from .errors import SageError
from .leases import Lease
from .manager import Manager
from .progress import ProgressCallback, silent
from .rag.search import MAX_TOP_K, MIN_TOP_K

BACKENDS = ("finetune", "vllm", "openai")


def top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k takes a whole number, not {text!r}") from None
    if not MIN_TOP_K <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"--top-k must be {MIN_TOP_K} to {MAX_TOP_K}, not {value}")
    return value


def keep_alive(text: str) -> float:
    try:
        return parse_duration(text)
    except SageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_serving_options(parser: argparse.ArgumentParser, settings: Settings | None = None) -> None:
    """Flags that choose and start the model (all faces)."""
    backend_default = settings.debug_backend if settings and settings.debug_backend else "finetune"
    model_default = settings.debug_finetune_model if settings else None
    group = parser.add_argument_group("model")
    group.add_argument("--backend", choices=BACKENDS, default=backend_default,
                       help="finetune: a fine-tune by name; vllm: a plain local model; openai: an existing "
                            "endpoint (default: SAGE_DEBUG_BACKEND or finetune)")
    group.add_argument("--finetune-model", default=model_default, metavar="NAME",
                       help="fine-tune under $SAGE_HOME/finetune_output (default: SAGE_DEBUG_FINETUNE_MODEL)")
    group.add_argument("--finetune-port", type=int, default=None, metavar="PORT",
                       help="port to ask for when a server starts (default 8000 or SAGE_FINETUNE_PORT; "
                            "a busy port is replaced by a free one)")
    group.add_argument("--merge", action="store_true",
                       help="serve the merged model (merged once, cached) instead of the adapter on its base")
    group.add_argument("--model", metavar="PATH_OR_NAME",
                       help="--backend vllm: local model folder; --backend openai: the model name to request")
    group.add_argument("--base-url", metavar="URL", help="--backend openai: e.g. http://host:8000/v1")
    group.add_argument("--api-key", metavar="KEY", help="--backend openai: the endpoint's API key")
    group.add_argument("--keep-alive", type=keep_alive, default=None, metavar="DURATION",
                       help="how long the server outlives its last user: 0, 30s, 5m, 1h, -1 for ever")
    group.add_argument("--vllm-arg", action="append", default=[], metavar="ARGS",
                       help="extra vLLM arguments, shell-quoted, e.g. --vllm-arg '--tensor-parallel-size 2'")


def add_chat_options(parser: argparse.ArgumentParser) -> None:
    """Flags that shape one answer (all faces)."""
    group = parser.add_argument_group("answer")
    group.add_argument("--index", nargs="?", const=DEFAULT_INDEX, default=None, metavar="NAME",
                       help=f"ground answers in a document index (bare --index: {DEFAULT_INDEX})")
    group.add_argument("--top-k", type=top_k, default=4, metavar="K", help="chunks retrieved per question (1-20)")
    group.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default="hybrid",
                       help="retrieval mode (default hybrid)")
    group.add_argument("--show-context", action="store_true", help="print the retrieved context sent to the model")
    group.add_argument("--system", metavar="TEXT", help="system prompt")
    group.add_argument("--max-tokens", type=int, default=256, metavar="N", help="longest answer (default 256)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")


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
    if not args.base_url or not args.model:
        raise SageError("--backend openai needs --base-url URL (e.g. http://host:8000/v1) and --model NAME; "
                        "add --api-key KEY if the endpoint wants one.")
    return Lease.unmanaged(Endpoint(args.base_url.rstrip("/"), args.api_key, args.model))
