"""One definition of the chat and serving options, for every face.

The ``sage chat`` command and the notebook magics parse the same flags (SAGE's names: ``--backend``,
``--finetune-model``, ``--finetune-port``, ``--index``, ``--top-k``) with the parser built here, and turn
turn them into engine calls through chat/backends.py. Defaults of ``--backend`` and ``--finetune-model`` come
from SAGE_DEBUG_BACKEND and SAGE_DEBUG_FINETUNE_MODEL through :class:`Settings`.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..core.config import MAX_TOP_K, MIN_TOP_K, Settings, check_port, parse_duration, split_vllm_args
from ..core.errors import SageError
from ..tracking.report import TRACKERS

if TYPE_CHECKING:
    from ..finetune.train import TrainOptions

BACKENDS = ("finetune", "vllm", "openai")
#: What a bare ``--index`` grounds answers in: SAGE's default index name.
DEFAULT_INDEX = "docs-public"
T = TypeVar("T")


def top_k(text: str) -> int:

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k takes a whole number, not {text!r}") from None
    if not MIN_TOP_K <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"--top-k must be {MIN_TOP_K} to {MAX_TOP_K}, not {value}")
    return value


def keep_alive(text: str) -> float:
    return _usage(parse_duration, text)


def port(text: str) -> int:
    return _usage(check_port, text)


def vllm_arg(text: str) -> str:
    """Checked here (a refused --port fails before anything starts); kept as written, split when used."""
    _usage(split_vllm_args, text)
    return text


def positive_lines(text: str) -> int:
    """`sage logs -n N`: a whole number of lines, at least one."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"-n takes a whole number of lines, 1 or more, not {text!r}")
    return value


class Secret(str):
    """An API key as parsed: used as the text it is, shown as ``<hidden>``, so the options Namespace (a panel's
    ``.options``, a debugger, a log line) never prints it."""

    def __repr__(self) -> str:
        return "<hidden>"


def _add_api_key(parser: Any, what: str, scope: str = "") -> None:
    """``--api-key KEY`` or ``--api-key-env NAME`` (not both): a key typed into a cell is saved with the notebook
    and its history, a variable's name is not. Unset, OPENAI_API_KEY is read when set (chat/backends.py)."""
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", metavar="KEY", type=Secret,
                      help=f"{scope}{what} (in a notebook it is saved with the cell: prefer --api-key-env)")
    keys.add_argument("--api-key-env", metavar="NAME",
                      help=f"{scope}the environment variable holding {what} (default: OPENAI_API_KEY when set)")


def _usage(check: Callable[[str], T], text: str) -> T:
    """A SageError from an engine check, as argparse's usage error (exit 2, one line)."""
    try:
        return check(text)
    except SageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


#: Options whose value is itself an option of another program (``--vllm-arg --enforce-eager``).
VALUE_OPTIONS = ("--vllm-arg",)


def join_option_values(argv: list[str]) -> list[str]:
    """``--vllm-arg --enforce-eager`` -> ``--vllm-arg=--enforce-eager``: argparse takes any word starting
    with ``--`` for an option of its own and would answer "expected one argument". The one place where CLI
    and magics fix that, before parsing."""
    joined: list[str] = []
    words = iter(argv)
    for word in words:
        if word in VALUE_OPTIONS:
            value = next(words, None)
            if value is None or value == "--":
                # no value: argparse then says "expected one argument" (joined as `--vllm-arg=--`, its handling
                # of `--` would make the value an empty list)
                joined.extend([word] if value is None else [word, value, *words])
            else:
                joined.append(f"{word}={value}")
        elif word == "--":
            joined.append(word)
            joined.extend(words)
        else:
            joined.append(word)
    return joined


def add_attach_options(group: Any, one_finetune: bool = True) -> None:
    """How a local fine-tune reaches a server sage_magic did not start (``--backend openai --finetune-model``,
    ``sage eval``'s remote:NAME): serving/remote.py. ``one_finetune`` adds --publish-as (a name for one)."""
    group.add_argument("--publish-dir", metavar="DIR", default=None,
                       help="with --base-url: publish the adapter into DIR, the folder the server's LoRA "
                            "filesystem resolver reads (default: SAGE_PUBLISH_DIR; unset: load it at runtime)")
    group.add_argument("--remote-root", metavar="PREFIX", default=None,
                       help="with --base-url, runtime loading: SAGE_HOME as the server mounts it (default: the "
                            "same path, the same machine)")
    if one_finetune:
        group.add_argument("--publish-as", metavar="NAME", default=None,
                           help="with --base-url: the model name to publish or load the fine-tune under "
                                "(default NAME-<fingerprint>)")
    group.add_argument("--replace", action="store_true",
                       help="with --base-url: replace a same-named adapter that is another fine-tune")
    group.add_argument("--unload-on-exit", action="store_true",
                       help="with --base-url: unload the adapter when done, if this process loaded it")


def add_serving_options(parser: argparse.ArgumentParser, settings: Settings | None = None) -> None:
    """Flags that choose and start the model (all faces)."""
    backend_default = settings.debug_backend if settings and settings.debug_backend else "finetune"
    model_default = settings.debug_finetune_model if settings else None
    group = parser.add_argument_group("model")
    group.add_argument("--backend", choices=BACKENDS, default=backend_default,
                       help="finetune: a fine-tune by name; vllm: a plain local model; openai: an existing "
                            "endpoint (default: SAGE_DEBUG_BACKEND or finetune)")
    group.add_argument("--finetune-model", default=model_default, metavar="NAME",
                       help="fine-tune under $SAGE_HOME/finetune_output (default: SAGE_DEBUG_FINETUNE_MODEL); with "
                            "--backend openai --base-url and no --model: put it onto that server")
    group.add_argument("--finetune-port", type=port, default=None, metavar="PORT",
                       help="also serve on this TCP port of 127.0.0.1, behind the server's API key (default: "
                            "SAGE_FINETUNE_PORT, else none: a private Unix socket only; a busy port is "
                            "replaced by a free one)")
    group.add_argument("--merge", action="store_true",
                       help="serve the merged model (merged once, cached) instead of the adapter on its base")
    group.add_argument("--model", metavar="PATH_OR_NAME",
                       help="--backend vllm: local model folder; --backend openai: the model name to request")
    group.add_argument("--base-url", metavar="URL", help="--backend openai: e.g. http://host:8000/v1")
    _add_api_key(group, "the endpoint's API key", "--backend openai: ")
    add_attach_options(group)
    group.add_argument("--keep-alive", type=keep_alive, default=None, metavar="DURATION",
                       help="how long the server outlives its last user: 0, 30s, 5m, 1h, -1 for ever")
    group.add_argument("--vllm-arg", action="append", type=vllm_arg, default=[], metavar="ARGS",
                       help="extra vLLM arguments, shell-quoted, repeatable, e.g. --vllm-arg --enforce-eager "
                            "or --vllm-arg=--max-num-seqs=4")


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
    group.add_argument("--seed", type=int, default=None, metavar="N",
                       help="sampling seed: the same answer again at a temperature above 0")
    group.add_argument("--param", type=request_param, action="append", dest="params", default=[],
                       metavar="KEY=VALUE", help="another sampling field for the request, repeatable, e.g. "
                       "--param top_p=0.9 --param min_tokens=64 (VALUE is read as JSON when it parses)")


#: Request fields that have a flag of their own, or that the engine sets itself.
_OWN_FIELDS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "seed": "--seed", "model": "--model",
               "messages": "the cell or question", "stream": "the engine", "stream_options": "the engine"}


def request_param(text: str) -> tuple[str, Any]:
    """`--param KEY=VALUE`: one extra field of the chat request body (vLLM's sampling fields: top_p, top_k,
    min_tokens, stop, repetition_penalty, ...). The server judges the field; a wrong one fails the request
    with vLLM's own message."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, e.g. top_p=0.9, not {text!r}")
    if key in _OWN_FIELDS:
        raise argparse.ArgumentTypeError(f"--param {key} is set by {_OWN_FIELDS[key]}, not by --param")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _modules(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("--target-modules takes comma-separated module names, e.g. q_proj,v_proj")
    return names


def add_report_to(parser: Any, choices: tuple[str, ...], what: str) -> None:
    """``--report-to``, repeatable, for training (every tracker) and evaluation (MLflow): one definition."""
    parser.add_argument("--report-to", action="append", choices=choices, default=[], metavar="TRACKER",
                        help=f"log {what} to {'|'.join(choices)}; repeatable (default none). MLflow: "
                             "MLFLOW_TRACKING_URI, else $SAGE_HOME/mlflow.db")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Flags of `sage finetune train` and `%sage finetune train` (the data source itself is the face's)."""
    from ..finetune.train import LR_SCHEDULERS, PRECISIONS, TrainOptions

    d = TrainOptions()
    columns = parser.add_argument_group("data")
    columns.add_argument("--prompt-col", default="prompt", metavar="COL", help="column of prompts (default prompt)")
    columns.add_argument("--response-col", default="response", metavar="COL",
                         help="column of answers to learn (default response)")
    columns.add_argument("--messages-col", default=None, metavar="COL",
                         help="column of chat conversations (lists of {role, content}) instead of prompt/response")
    group = parser.add_argument_group("training")
    group.add_argument("--base", metavar="MODEL", help="base model: a name under $SAGE_HOME/models, a name mapped "
                                                       "in models.json, or a path (default on --resume: its own)")
    group.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    group.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N steps (wins over "
                                                                                 "--epochs)")
    group.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    group.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    group.add_argument("--alpha", type=int, default=d.alpha, help=f"LoRA alpha (default {d.alpha})")
    group.add_argument("--target-modules", type=_modules, default=None, metavar="A,B",
                       help="layers to adapt, e.g. q_proj,v_proj (default: every linear layer)")
    group.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per step (default "
                                                                            f"{d.batch_size})")
    group.add_argument("--max-length", type=int, default=d.max_length,
                       help=f"longest row in tokens, chat template included; longer rows are refused "
                            f"(default {d.max_length})")
    group.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    group.add_argument("--eval-split", type=float, default=d.eval_split, metavar="FRACTION",
                       help="rows held out to measure eval loss at each checkpoint (default 0)")
    group.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                       help=f"checkpoint every N steps, and at the end (default {d.save_every})")
    group.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                       help=f"batches accumulated into one optimizer step (default {d.grad_accum})")
    group.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler,
                       help=f"learning-rate schedule after the warm-up (default {d.lr_scheduler})")
    group.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, metavar="R",
                       help="share of the steps spent warming the learning rate up from 0 (default 0)")
    group.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="W",
                       help="AdamW weight decay (default 0)")
    group.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                       help="auto: bf16 mixed precision on a GPU that has it, else fp32 (a CPU); the adapter's "
                            "weights stay fp32 (default auto)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, slower steps")
    group.add_argument("--packing", action="store_true",
                       help="pack several rows into each --max-length sequence (best with FlashAttention on a GPU)")
    group.add_argument("--load-in-4bit", action="store_true",
                       help="QLoRA: the base in 4 bits (nf4) with bitsandbytes; needs a CUDA GPU")
    group.add_argument("--deepspeed", metavar="CONFIG.json", default=None,
                       help="train under DeepSpeed with this config (passed to the Trainer; needs deepspeed)")
    group.add_argument("--fsdp", action="store_true",
                       help="shard the model with FSDP over several processes (passed to the Trainer)")
    group.add_argument("--resume", action="store_true", help="continue NAME from its newest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace an existing fine-tune NAME")
    add_report_to(group, TRACKERS, "the run (named NAME; tensorboard: NAME/runs/)")
    spread = parser.add_argument_group("several processes and machines (torchrun)")
    spread.add_argument("--processes", type=int, default=d.processes, metavar="N",
                        help="data-parallel training processes on this machine: one per GPU (NCCL), or on CPU "
                             "(gloo) a share of the cores each (default 1)")
    spread.add_argument("--nnodes", type=int, default=d.nnodes, metavar="N",
                        help="machines training together; run the same command on each (default 1)")
    spread.add_argument("--node-rank", type=int, default=d.node_rank, metavar="R",
                        help="this machine's number, 0 to N-1; machine 0 writes the fine-tune (default 0)")
    spread.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="where the machines meet: machine 0's address and a free port, the same on each")


def train_options(args: argparse.Namespace) -> TrainOptions:
    """The TrainOptions that parsed `add_train_options` flags describe."""
    from ..finetune.train import TrainOptions

    return TrainOptions(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
                        target_modules=args.target_modules, batch_size=args.batch_size, max_length=args.max_length,
                        seed=args.seed, eval_split=args.eval_split, save_every=args.save_every, resume=args.resume,
                        overwrite=args.overwrite, grad_accum=args.grad_accum, lr_scheduler=args.lr_scheduler,
                        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, precision=args.precision,
                        gradient_checkpointing=args.gradient_checkpointing, packing=args.packing,
                        load_in_4bit=args.load_in_4bit, deepspeed=args.deepspeed, fsdp=args.fsdp,
                        report_to=tuple(args.report_to), processes=args.processes, nnodes=args.nnodes,
                        node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint)


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """Flags of `sage eval` and `%sage eval` (the table itself is the face's: a file or a DataFrame)."""
    parser.add_argument("--models", required=True, metavar="A,B,base",
                        help="fine-tune names, base (the base of the fine-tunes named), openai:MODEL (on --base-url), "
                             "remote:NAME (local fine-tune NAME put onto --base-url)")
    parser.add_argument("--prompt-col", default="prompt", metavar="COL", help="column of prompts (default prompt)")
    parser.add_argument("--expected-col", default="expected", metavar="COL",
                        help="column of expected answers (default expected, if present)")
    parser.add_argument("--metric", action="append", dest="metrics", default=None, metavar="METRIC",
                        help="exact, contains, rougeL, embedding or judge:MODEL; repeatable (default exact)")
    parser.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed sent with every request")
    parser.add_argument("--max-tokens", type=int, default=128, metavar="N", help="longest answer (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt sent with every prompt")
    parser.add_argument("--base-url", metavar="URL", help="endpoint of openai:MODEL entries, e.g. http://host:8000/v1")
    _add_api_key(parser, "the API key of --base-url")
    add_attach_options(parser, one_finetune=False)
    parser.add_argument("--save", metavar="PATH", help="write results and model fingerprints as JSON")
    add_report_to(parser, ("none", "mlflow"), "the summary, every row and the models' fingerprints as a run")


def model_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def option_parser(settings: Settings | None = None,
                  parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The chat flags of ``sage chat``, for the notebook faces and the session's defaults."""
    parser = parser_class(prog="%%sage", add_help=False)
    add_serving_options(parser, settings)
    add_chat_options(parser)
    return parser
