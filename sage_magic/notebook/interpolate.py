"""Put notebook context into a prompt: ``{var}``, ``{In[n]}``, ``{Out[n]}``, ``{Err[n]}``, as jupyter-ai does.

Each ``{field}`` is looked up in the user namespace with Python's format-field rules (``{df}``, ``{In[3]}``,
``{cfg.path}``, ``{x!r}``, ``{pi:.2f}``). A field that does not resolve stays exactly as written, so code with
braces in a prompt survives; ``{{`` and ``}}`` give literal braces. A pandas DataFrame (or Series) becomes a
summary (shape, dtypes, first rows), never a 10,000-line dump, and any value is cut at :data:`MAX_CHARS`.

``Err[n]`` is filled by :func:`record_error`, which the extension registers as a ``post_run_cell`` hook: it
only reads the result of a cell, it never takes over IPython's exception handling.
"""

from __future__ import annotations

import os
import re
import string
import sys
import traceback
from typing import Any, Mapping

MAX_CHARS = 4000
HEAD_ROWS = 5
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}\n]+)\}")
_FORMATTER = string.Formatter()


def interpolate(prompt: str, namespace: Mapping[str, Any]) -> str:
    """``prompt`` with every resolvable ``{field}`` replaced from ``namespace``."""

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        try:
            [(_, name, spec, conversion)] = list(_FORMATTER.parse(token))
            if not name or name[0].isdigit():
                return token
            value, _ = _FORMATTER.get_field(name, (), namespace)
            if conversion:
                return _cut(_FORMATTER.convert_field(value, conversion))
            return _cut(format(value, spec) if spec else describe(value))
        except Exception:  # anything that does not resolve is left as the user wrote it
            return token

    return _FIELD.sub(replace, prompt)


def describe(value: Any) -> str:
    """How a value reads in a prompt: tables as a summary, everything else as ``str``."""
    if _is_pandas(value, "DataFrame"):
        dtypes = ", ".join(f"{column}: {dtype}" for column, dtype in value.dtypes.items())
        return (f"DataFrame with {value.shape[0]} rows and {value.shape[1]} columns ({dtypes}). "
                f"First rows:\n{value.head(HEAD_ROWS).to_string()}")
    if _is_pandas(value, "Series"):
        return (f"Series {value.name!r} with {len(value)} values of dtype {value.dtype}. "
                f"First values:\n{value.head(HEAD_ROWS).to_string()}")
    return str(value)


def _is_pandas(value: Any, kind: str) -> bool:
    """Recognise pandas types without importing pandas (the kernel may never have loaded it)."""
    cls = type(value)
    return cls.__module__.split(".")[0] == "pandas" and any(c.__name__ == kind for c in cls.__mro__)


def _cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    return text[:MAX_CHARS] + f"\n… ({len(text) - MAX_CHARS} more characters cut)"


def record_error(namespace: dict[str, Any], execution_count: int | None, error: BaseException | None) -> None:
    """Keep the error of cell ``execution_count`` as ``Err[n]`` (its type, message and last frames)."""
    if error is None or execution_count is None:
        return
    tb = error.__traceback__
    while tb is not None and _is_ipython_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next  # IPython's own run_code frame says nothing about the user's error
    lines = traceback.format_exception(type(error), error, tb, limit=-3)
    namespace.setdefault("Err", {})[execution_count] = "".join(lines).strip()


def _is_ipython_frame(filename: str) -> bool:
    package = sys.modules.get("IPython")
    return package is not None and filename.startswith(os.path.dirname(package.__file__ or "") + os.sep)
