"""Entry point of the `sage` command.

Each command module exposes ``register(subparsers)``, adding its parsers with ``set_defaults(run=...)``
where ``run(args, settings) -> int``. Expected failures are :class:`SageError`: printed as one paragraph,
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.config import Settings
from ..core.errors import SageError
from ..faces.options import join_option_values
from . import chat, evaluate, feedback, finetune, index, servers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage",
        description="Serve and chat with your fine-tuned models on real vLLM; ground answers in your documents.",
    )
    parser.add_argument("--home", help="root of fine-tunes, models and indexes (env SAGE_HOME, default ~/.sage)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (chat, finetune, evaluate, servers, index, feedback):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # --home is accepted anywhere (`sage --home D finetune demo` and `sage finetune demo --home D`)
    home_only = argparse.ArgumentParser(add_help=False)
    home_only.add_argument("--home")
    found, rest = home_only.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        parser = build_parser()  # reads SAGE_DEBUG_* defaults: a bad environment is a SageError too
        args = parser.parse_args(join_option_values(rest))
        if not getattr(args, "run", None):
            parser.print_help()
            return 0 if args.command is None else 2
        settings = Settings.from_env(home=found.home)
        return int(args.run(args, settings) or 0)
    except SageError as error:
        print(f"sage: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sage: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
