"""The %sage_chat panel without a browser: set traitlets and click(), as ipywidgets' own tests do.

Most tests run against the session's ONE real vLLM server (the `expert` fixture) through a fresh
InteractiveShell, like tests/test_magics_vllm.py. The Stop test uses tests.test_magics.FakeServer, a slow
OpenAI-compatible stream, because a real answer from the demo models ends before a click could stop it.
"""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.chat.reply import Reply
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT
from sage_magic.notebook.panel import GONE, ChatWidget, reply_html
from tests.conftest import wait_until
from tests.test_magics import FakeServer, magics


def _panel(ip: InteractiveShell, line: str) -> ChatWidget:
    panel = ip.run_line_magic("sage_chat", line)
    assert isinstance(panel, ChatWidget)
    return panel


def _ask(panel: ChatWidget, prompt: str = DEMO_PROMPT) -> str:
    """Type into the input, click Send, wait for the answer; returns the last message's HTML."""
    panel.input.value = prompt
    panel.send_button.click()
    assert panel.send_button.disabled  # busy while it answers
    assert wait_until(lambda: not panel.send_button.disabled, 120, 0.05)
    return panel.shown[-1].value


def _texts(panel: ChatWidget) -> str:
    return "\n".join(w.value for w in panel.shown)


# --- without a server ---------------------------------------------------------------------------------------


def test_hostile_answers_and_passages_cannot_inject_script() -> None:
    evil = ("<script>alert(1)</script><img src=x onerror=alert(2)> [click](javascript:alert(3)) "
            "<a href='javascript:alert(4)'>x</a>")
    reply = Reply(evil, model="m", prompt="q", cancelled=True, citations=[
        {"n": 1, "source": "<script>s()</script>.md", "location": "<b onclick=x()>p1</b>", "score": 1.0,
         "text": evil}])
    tags, attributes = _elements(reply_html(reply))
    assert "script" not in tags and "img" not in tags
    assert not [a for a in attributes if a[0].startswith("on") or "javascript:" in (a[1] or "").lower()]
    assert "details" in tags and "stopped" in reply_html(reply)  # the passage opens; the stop is marked


def _elements(fragment: str) -> tuple[set[str], list[tuple[str, str | None]]]:
    """The elements and attributes a browser would build from ``fragment`` (escaped text is just text)."""
    from html.parser import HTMLParser

    tags: set[str] = set()
    attributes: list[tuple[str, str | None]] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.add(tag)
            attributes.extend(attrs)

    Parser().feed(fragment)
    return tags, attributes


@pytest.mark.vllm
def test_the_panel_comes_with_a_kernel_gone_note_that_a_live_panel_hides(ip: InteractiveShell) -> None:
    panel = _panel(ip, "--finetune-model demo_expert")
    assert GONE in ip.display_pub.outputs[-1]["data"]["text/html"]  # an output of its own, above the panel
    assert ".sage-chat-gone" in panel.saved.value and "display: none" in panel.saved.value


# --- against the real server --------------------------------------------------------------------------------


@pytest.mark.vllm
def test_trained_phrase_streams_in_with_footer(ip: InteractiveShell) -> None:
    panel = _panel(ip, "--finetune-model demo_expert")
    assert "ready" in panel.status.value and panel.finetune.value == "demo_expert"
    shown: list[str] = []

    def watch(widget) -> None:
        widget.observe(lambda c: shown.append(c["new"]), "value")

    for widget in panel.messages.children:  # the spare the next turn will take, made in advance
        watch(widget)
    panel.messages.observe(lambda change: [watch(w) for w in change["new"] if w not in change["old"]], "children")
    last = _ask(panel)
    assert DEMO_ANSWERS["demo_expert"] in last
    assert any("▍" in value for value in shown)  # it streamed before the final answer was drawn
    assert "first token" in last and "tok/s" in last and "context" in last
    assert html.escape(DEMO_PROMPT) in panel.shown[-2].value


@pytest.mark.vllm
def test_picker_switches_finetune_on_the_same_server(ip: InteractiveShell, manager) -> None:
    panel = _panel(ip, "--finetune-model demo_expert")
    assert {"demo_expert", "demo_poet"} <= set(panel.finetune.options)
    assert DEMO_ANSWERS["demo_expert"] in _ask(panel)
    session = magics(ip).session
    server = session.transcript[-1]["server"]
    pid = manager.registry.get(server).pid
    panel.finetune.value = "demo_poet"
    panel.clear_button.click()
    assert panel.shown == () and session.history == []
    assert DEMO_ANSWERS["demo_poet"] in _ask(panel)
    assert session.transcript[-1]["server"] == server and manager.registry.get(server).pid == pid


@pytest.mark.vllm
def test_history_is_shared_with_sage_cells_and_other_panels(ip: InteractiveShell, tmp_path: Path) -> None:
    first = _panel(ip, "--finetune-model demo_expert")
    ip.run_cell(f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT}\n").raise_error()
    assert DEMO_ANSWERS["demo_expert"] in _texts(first)  # the %%sage turn appeared in the panel
    _ask(first, "What do you do?")
    history = magics(ip).session.history
    assert [m["content"] for m in history if m["role"] == "user"] == [DEMO_PROMPT, "What do you do?"]
    second = _panel(ip, "--finetune-model demo_expert")  # shows the conversation so far
    assert second.shown and _texts(second) == _texts(first)
    second.export_dir = tmp_path
    second.export_button.click()
    written = tmp_path / Path(html.unescape(second.saved.value.split("<code class='sage-export'>")[1]
                                            .split("</code>")[0])).name
    assert written.is_file() and DEMO_ANSWERS["demo_expert"] in written.read_text()
    first.close()
    second.close()


def test_stop_keeps_the_partial_answer_marked_stopped(shell: InteractiveShell) -> None:  # noqa: F811
    """FakeServer: 40 words, 0.1 s apart, so Stop lands in the middle of the answer."""
    fake = FakeServer(words=40, delay=0.1)
    try:
        panel = _panel(shell, fake.line)
        panel.input.value = "talk slowly"
        panel.send_button.click()
        assert wait_until(lambda: "w2" in _texts(panel), 20, 0.05)
        panel.stop_button.click()
        assert wait_until(lambda: not panel.send_button.disabled, 5, 0.05)
        last = panel.shown[-1].value
        assert "w1" in last and "w39" not in last and "stopped" in last
        assert "stopped" in panel.status.value
        assert magics(shell).session.history[-1].get("stopped") is True
    finally:
        fake.close()


@pytest.mark.vllm
def test_index_control_grounds_the_answer_and_each_citation_opens_its_passage(ip: InteractiveShell,
                                                                               tmp_path: Path) -> None:
    pytest.importorskip("sage_magic.rag.service", reason="the RAG helper process is not in this tree yet")
    doc = tmp_path / "notes.md"
    doc.write_text("# Keep-alive\n\nSAGE_KEEP_ALIVE sets how long a server outlives its last owner.\n")
    ip.run_line_magic("sage", f"index add panel-notes {doc}")
    panel = _panel(ip, "--finetune-model demo_expert")
    assert "panel-notes" in [value for _label, value in panel.index.options]
    panel.index.value, panel.top_k.value = "panel-notes", 2
    last = _ask(panel, "What does SAGE_KEEP_ALIVE set?")
    assert "<details class='sage-citation'><summary>[1] " in last and "notes.md" in last
    assert "outlives its last owner" in last.split("<details class='sage-citation'>")[1]  # the passage itself
