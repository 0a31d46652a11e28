"""Model text and retrieved documents cannot carry script, event handlers or javascript: links into a notebook."""

from __future__ import annotations

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
]


class _Active(HTMLParser):
    """Collects what a browser would run: dangerous elements, on* attributes, script-protocol URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "iframe", "svg", "object", "embed", "style", "form"):
            self.found.append(tag)
        for name, value in attrs:
            url = (value or "").strip().lower().replace("\t", "").replace("\n", "")
            if name.startswith("on") or url.startswith(("javascript:", "vbscript:", "data:text")):
                self.found.append(f"{tag} {name}={value}")


def _unsafe(fragment: str) -> list[str]:
    parser = _Active()
    parser.feed(fragment)
    return parser.found


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("fmt", render.FORMATS)
def test_no_format_lets_active_content_through(text: str, fmt: str) -> None:
    bundle = render.body(f"Here you go:\n\n{text}\n", fmt)
    assert not _unsafe(bundle.get(render.MIME, "")), bundle


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
