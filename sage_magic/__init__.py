"""sage_magic: chat with your own fine-tuned model, served by real vLLM, from a notebook or a terminal.

Importing this package is cheap on purpose: nothing here imports torch, transformers, peft or vllm, and
``%load_ext sage_magic`` only registers the magics (the engine, HTTP clients and Markdown load at first use).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext sage_magic``: register ``%%sage``, ``%sage`` and ``%sage_chat``."""
    from .notebook.extension import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext sage_magic``: remove the magics; servers follow their keep-alive."""
    from .notebook.extension import unregister

    unregister(ipython)
