"""The %sage_chat panel without a browser: set traitlets and click(), as ipywidgets' own tests do.

Most tests run against the session's ONE real vLLM server (the `expert` fixture) through a fresh
InteractiveShell, like tests/test_magics_vllm.py; the cell-id test drives a real kernel through jupyter_client,
since the id comes from the front end's execute_request. The first-Send test starts a server of its own (that
start is what it watches). The Stop test uses tests.test_magics.FakeServer, a slow OpenAI-compatible stream,
because a real answer from the demo models ends before a click could stop it.
"""

from __future__ import annotations

import html
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.chat.reply import Reply
from sage_magic.core.errors import SageError
from sage_magic.feedback.data import feedback_rows
from sage_magic.feedback.store import FeedbackStore
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT
from sage_magic.notebook.panel import GONE, NO_ANYWIDGET, ChatWidget, reply_html
from sage_magic.notebook.parsing import OptionError
from sage_magic.rag.service import SearchService
from sage_magic.serving.registry import Registry
from tests.conftest import env_for, new_shell, sage_processes, wait_until
from tests.test_magics import FakeServer, magics


def _panel(ip: InteractiveShell, line: str) -> ChatWidget:
    panel = ip.run_line_magic("sage_chat", line)
    assert isinstance(panel, ChatWidget)
    return panel


def _ask(panel: ChatWidget, prompt: str = DEMO_PROMPT, timeout: float = 120) -> str:
    """Type into the input, click Send, wait for the answer; returns the last message's HTML."""
    panel.input.value = prompt
    panel.send_button.click()
    assert panel.send_button.disabled  # busy while it answers
    assert wait_until(lambda: not panel.send_button.disabled, timeout, 0.05)
    return panel.shown[-1].value


def _ask_for(panel: ChatWidget, finetune: str, timeout: float = 120) -> None:
    """Ask the demo prompt and expect ``finetune``'s known answer. Otherwise fail with the whole message the
    panel showed: pytest cuts a long string short in an assertion, which once hid a CI failure's cause."""
    shown = _ask(panel, timeout=timeout)
    if DEMO_ANSWERS[finetune] not in shown:
        pytest.fail(f"Expected {finetune}'s answer; the panel showed:\n{html.unescape(shown)}")


def _texts(panel: ChatWidget) -> str:
    return "\n".join(w.value for w in panel.shown)


@pytest.fixture
def demo_shell(fresh_settings, monkeypatch: pytest.MonkeyPatch):
    """A shell on the demo home with a registry of its own: nothing runs there unless this test starts it,
    and what it starts must be gone once the extension is unloaded (keep-alive 0)."""
    for key, value in env_for(fresh_settings).items():
        monkeypatch.setenv(key, value)
    shell = new_shell()
    yield shell
    shell.extension_manager.unload_extension("sage_magic")
    assert wait_until(lambda: not sage_processes(fresh_settings.runtime_dir), 60)


def _nothing_runs(settings) -> bool:
    return Registry(settings.runtime_dir).all() == [] and not sage_processes(settings.runtime_dir)


# --- without a server ---------------------------------------------------------------------------------------


def test_a_bare_sage_chat_opens_a_finetune_picker_and_starts_nothing(demo_shell: InteractiveShell,
                                                                     fresh_settings) -> None:
    result = demo_shell.run_cell("%sage_chat")  # what the JupyterLab palette's "Open chat" runs
    result.raise_error()
    panel = result.result
    assert {"demo_expert", "demo_poet"} <= set(panel.finetune.options) and panel.finetune.value is None
    assert "Pick a fine-tune" in panel.status.value
    assert GONE in demo_shell.display_pub.outputs[-1]["data"]["text/html"]
    panel.input.value = DEMO_PROMPT
    panel.send_button.click()  # nothing picked yet: the panel says so and keeps the question
    assert panel.input.value == DEMO_PROMPT and panel.shown == () and not panel.send_button.disabled
    assert "Pick a fine-tune" in panel.status.value
    assert _nothing_runs(fresh_settings)


def test_with_no_finetunes_the_panel_says_how_to_build_the_demo(shell: InteractiveShell) -> None:
    result = shell.run_cell("%sage_chat")
    result.raise_error()
    assert result.result.finetune.options == ()
    assert "%sage finetune demo" in html.unescape(result.result.status.value)


def test_fine_tunes_built_after_the_panel_opened_appear_in_its_picker(shell: InteractiveShell) -> None:
    """The picker was filled once, when the panel opened: a fine-tune trained or built in a later cell could
    only be chosen by re-running `%sage_chat`. Built here in a child process, as a user's cell does."""
    panel = _panel(shell, "")
    assert panel.finetune.options == ()
    shell.run_line_magic("sage", "finetune demo")
    assert {"demo_expert", "demo_poet"} <= set(panel.finetune.options)
    assert panel.finetune.value is None  # offered, not chosen for the user


@pytest.mark.parametrize("line", ["", "--finetune-model demo_expert"])
def test_without_ipywidgets_sage_chat_says_what_to_install_before_any_server_starts(
        demo_shell: InteractiveShell, fresh_settings, monkeypatch: pytest.MonkeyPatch, line: str) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now fails, as when not installed
    error = demo_shell.run_cell(f"%sage_chat {line}").error_in_exec
    assert isinstance(error, SageError) and "ipywidgets" in str(error) and "pip install" in str(error)
    assert _nothing_runs(fresh_settings)


def test_without_anywidget_the_input_says_that_enter_does_not_send(shell: InteractiveShell,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anywidget", None)
    result = shell.run_cell("%sage_chat")
    result.raise_error()
    assert result.result.input.placeholder == NO_ANYWIDGET


@pytest.mark.parametrize("line, says", [("--compare demo_expert,base", "one model at a time"),
                                        ("-f code", "drop -f code")])
def test_options_a_panel_cannot_honour_are_refused_in_one_line(shell: InteractiveShell, line: str,
                                                               says: str) -> None:
    result = shell.run_cell(f"%sage_chat {line}")
    assert isinstance(result.error_in_exec, OptionError) and result.result is None
    assert says in str(result.error_in_exec) and "\n" not in str(result.error_in_exec)


def test_markdown_typed_or_configured_formats_do_not_stop_the_panel(shell: InteractiveShell) -> None:
    magics(shell).default_format = "code"  # for %%sage cells; the panel draws Markdown regardless
    for line in ("%sage_chat", "%sage_chat -f markdown"):
        result = shell.run_cell(line)
        result.raise_error()
        assert isinstance(result.result, ChatWidget)


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
    # the finished footer; tok/s is left out, rightly, when a 13-token answer reaches the kernel in one burst
    assert "first token" in last and " out" in last and "context" in last
    assert html.escape(DEMO_PROMPT) in panel.shown[-2].value


@pytest.mark.vllm
def test_under_each_answer_thumbs_and_correct_store_marks_at_once(ip: InteractiveShell, settings) -> None:
    """👎 then Correct (the answer as editable text) then Save: both marks are in the store the moment each
    click returns; a `%sage rate good` typed in a cell lights that answer's 👍 in the panel."""
    panel = _panel(ip, "--finetune-model demo_expert --new-chat")
    _ask(panel)
    bar = panel._marks[magics(ip).session.replies[-1].feedback["turn"]]
    assert bar.box.layout.display == "" and bar.editing.layout.display == "none"
    before = len(feedback_rows(FeedbackStore(settings.home), "demo_expert"))
    bar.bad.click()
    assert bar.bad.button_style == "danger" and "marked bad" in bar.note.value
    bar.correct.click()
    assert bar.editing.layout.display == "" and bar.editor.value == DEMO_ANSWERS["demo_expert"]
    bar.editor.value = "I am an expert, and a careful one."
    bar.save.click()
    assert bar.editing.layout.display == "none" and "correction saved" in bar.note.value
    rows = feedback_rows(FeedbackStore(settings.home), "demo_expert")
    assert len(rows) == before + 1  # one turn, two marks
    assert rows[-1]["rating"] == "bad" and rows[-1]["correction"] == "I am an expert, and a careful one."
    assert rows[-1]["answer"] == DEMO_ANSWERS["demo_expert"] and rows[-1]["fingerprint"]
    ip.run_line_magic("sage", "rate good")
    assert bar.good.button_style == "success" and bar.bad.button_style == ""
    bar.correct.click()
    bar.editor.value = " "
    bar.save.click()  # an empty correction is refused in the bar, and nothing is stored
    assert "empty" in bar.note.value and bar.editing.layout.display == ""
    (last,) = [r for r in feedback_rows(FeedbackStore(settings.home), "demo_expert") if r["turn"] == bar.turn]
    assert len(last["marks"]) == 3 and last["rating"] == "good"
    assert last["correction"] == "I am an expert, and a careful one."


@pytest.mark.vllm
def test_picker_switches_finetune_on_the_same_server(ip: InteractiveShell, manager) -> None:
    panel = _panel(ip, "--finetune-model demo_expert")
    assert {"demo_expert", "demo_poet"} <= set(panel.finetune.options)
    _ask_for(panel, "demo_expert")
    session = magics(ip).session
    server = session.transcript[-1]["server"]
    pid = manager.registry.get(server).pid
    panel.finetune.value = "demo_poet"
    panel.clear_button.click()
    assert panel.shown == () and session.history == []
    _ask_for(panel, "demo_poet")
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
    doc = tmp_path / "notes.md"
    doc.write_text("# Keep-alive\n\nSAGE_KEEP_ALIVE sets how long a server outlives its last owner.\n")
    ip.run_line_magic("sage", f"index add panel-notes {doc}")
    panel = _panel(ip, "--finetune-model demo_expert")
    assert "panel-notes" in [value for _label, value in panel.index.options]
    panel.index.value, panel.top_k.value = "panel-notes", 2
    last = _ask(panel, "What does SAGE_KEEP_ALIVE set?")
    assert "<details class='sage-citation'><summary>[1] " in last and "notes.md" in last
    assert "outlives its last owner" in last.split("<details class='sage-citation'>")[1]  # the passage itself
    assert isinstance(magics(ip).session.search().__self__, SearchService)  # searched in the helper process


# --- one panel per cell -------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_rerunning_the_cell_leaves_one_panel_that_draws_the_answer_once(ip: InteractiveShell) -> None:
    panels = []
    for _ in range(3):  # this shell sends no cell id: the same text is the same cell
        result = ip.run_cell("%sage_chat --finetune-model demo_expert")
        result.raise_error()
        panels.append(result.result)
    *old, last = panels
    assert wait_until(lambda: not any(p._worker.is_alive() for p in old), 30, 0.05)
    ip.run_cell(f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT}\n").raise_error()
    assert [p for p in panels if DEMO_ANSWERS["demo_expert"] in _texts(p)] == [last]
    assert all(p.box.comm is None for p in old) and last.box.comm is not None
    extra = _panel(ip, "--finetune-model demo_expert")  # called outside a cell: a panel of its own
    assert last.box.comm is not None
    ip.extension_manager.unload_extension("sage_magic")  # closes every panel
    assert wait_until(lambda: not last._worker.is_alive() and not extra._worker.is_alive(), 30, 0.05)
    assert last.box.comm is None and extra.box.comm is None


def _execute(client, code: str, cell_id: str | None = None, timeout: float = 300) -> str:
    """Run ``code`` as JupyterLab does: the cell's id travels in the execute_request's metadata."""
    msg = client.session.msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                                 "user_expressions": {}, "allow_stdin": False,
                                                 "stop_on_error": True},
                             metadata={"cellId": cell_id} if cell_id else {})
    client.shell_channel.send(msg)
    outputs: list[str] = []
    while True:
        reply = client.get_iopub_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        if reply["msg_type"] == "stream":
            outputs.append(reply["content"]["text"])
        elif reply["msg_type"] == "error":
            outputs.append("\n".join(reply["content"]["traceback"]))
        elif reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
            break
    assert client.get_shell_msg(timeout=timeout)["content"]["status"] == "ok", "".join(outputs)
    return "".join(outputs)


#: In the kernel: the panels' worker threads (once the closed ones have returned) and the widgets that draw
#: the answer.
COUNT_PANELS = textwrap.dedent("""
    import json, threading, time
    from ipywidgets import HTML
    from ipywidgets.widgets.widget import _instances
    workers = lambda: sum(t.name == "sage-chat" for t in threading.enumerate())
    deadline = time.monotonic() + 60
    while workers() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    drawn = sum(isinstance(w, HTML) and ANSWER in w.value for w in list(_instances.values()))
    print(json.dumps({"workers": workers(), "drawn": drawn}))
""")


@pytest.mark.kernel
@pytest.mark.vllm
def test_in_a_real_kernel_a_rerun_cell_replaces_its_panel(settings, expert) -> None:
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env_for(settings))  # the shared registry: the kernel reuses the `expert` server
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        _execute(client, "%load_ext sage_magic")
        for _ in range(3):
            _execute(client, "%sage_chat --finetune-model demo_expert", cell_id="the-chat-cell")
        _execute(client, f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT}\n")
        counts = json.loads(_execute(client, f"ANSWER = {DEMO_ANSWERS['demo_expert']!r}\n{COUNT_PANELS}"))
        assert counts == {"workers": 1, "drawn": 1}
        # a mark, then the kernel SIGKILLed at once (no exit handler runs, nothing is flushed): the mark stays
        _execute(client, "%sage correct --text 'Kept through a kill.'")
        os.kill(km.provisioner.process.pid, signal.SIGKILL)
        (row,) = [r for r in feedback_rows(FeedbackStore(settings.home), "demo_expert")
                  if r["correction"] == "Kept through a kill."]
        assert row["answer"] == DEMO_ANSWERS["demo_expert"] and row["prompt"] == DEMO_PROMPT
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.vllm
def test_the_first_send_starts_the_server_with_progress_in_the_panel(demo_shell: InteractiveShell,
                                                                     fresh_settings) -> None:
    registry = Registry(fresh_settings.runtime_dir)
    panel = demo_shell.run_cell("%sage_chat", cell_id="chat").result
    assert registry.all() == []  # the cell started nothing
    statuses: list[str] = []
    bar: list[str] = []
    panel.status.observe(lambda change: statuses.append(html.unescape(change["new"])), "value")
    panel.progress.layout.observe(lambda change: bar.append(change["new"]), "display")
    panel.finetune.value = "demo_expert"
    _ask_for(panel, "demo_expert", timeout=600)
    assert any(">launch:" in s or ">load:" in s for s in statuses) and "" in bar  # its phases, with a bar
    [record] = registry.all()
    # the cell edited and run again: the thread that started the server ends; a new chat gets the exact phrase
    again = demo_shell.run_cell("%sage_chat --new-chat", cell_id="chat").result
    assert wait_until(lambda: not panel._worker.is_alive(), 30, 0.05)
    again.finetune.value = "demo_expert"
    _ask_for(again, "demo_expert")
    assert [(r.id, r.pid) for r in registry.all()] == [(record.id, record.pid)]  # the same server answered


@pytest.mark.vllm
def test_new_chat_opens_an_empty_conversation_and_o_keeps_each_answer(ip: InteractiveShell) -> None:
    ip.run_cell(f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT}\n").raise_error()
    panel = _panel(ip, "--new-chat -o last --finetune-model demo_expert")
    session = magics(ip).session
    assert panel.shown == () and session.history == []
    _ask_for(panel, "demo_expert")
    last = ip.user_ns["last"]
    assert isinstance(last, Reply) and DEMO_ANSWERS["demo_expert"] in last and last.model == "demo_expert"
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # the earlier turn was forgotten
