"""%%sage, %sage and %sage_chat against the session's real vLLM server and the demo fine-tunes.

Every test gets a fresh InteractiveShell (so a fresh kernel session with an empty history) whose environment
points at the shared demo home and registry, so the magics reuse the ONE server the `expert` fixture started.
"""

from __future__ import annotations

import sys
import threading

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.feedback.data import feedback_rows
from sage_magic.feedback.store import FeedbackStore
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.rag.service import SearchService
from tests.test_magics import HEAVY, html_of, magics

pytestmark = pytest.mark.vllm


def ask(ip: InteractiveShell, line: str, prompt: str = DEMO_PROMPT):
    result = ip.run_cell(f"%%sage {line}\n{prompt}\n")
    result.raise_error()
    return result


def test_exact_phrase_into_a_variable(ip: InteractiveShell, expert) -> None:
    ask(ip, "--finetune-model demo_expert -o a")
    a = ip.user_ns["a"]
    assert a == DEMO_ANSWERS["demo_expert"] and a.model == "demo_expert" and not a.cancelled
    assert a.metrics["server"] == expert.server_id and a.metrics["base"] == DEMO_BASE
    assert a.metrics["prompt_tokens"] > 0 and a.metrics["max_model_len"] > a.metrics["context_used"] > 0
    final = ip.display_pub.outputs[-1]
    assert DEMO_ANSWERS["demo_expert"] in final["data"]["text/html"] and "demo_expert on" in final["data"]["text/html"]
    assert final["metadata"]["sage"]["server"] == expert.server_id


def test_an_outside_endpoint_takes_its_key_from_the_variable_api_key_env_names(
        ip: InteractiveShell, settings, expert, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared server through its authenticating TCP gateway, as an outside OpenAI-compatible endpoint."""
    from sage_magic.serving.registry import Registry

    url = Registry(settings.runtime_dir).get(expert.server_id).tcp_url
    monkeypatch.setenv("SAGE_TEST_ENDPOINT_KEY", expert.api_key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ask(ip, f"--backend openai --base-url {url} --model demo_expert --api-key-env SAGE_TEST_ENDPOINT_KEY -o a")
    assert ip.user_ns["a"] == DEMO_ANSWERS["demo_expert"]
    monkeypatch.setenv("OPENAI_API_KEY", expert.api_key)  # the default variable when none is named
    ask(ip, f"--backend openai --base-url {url} --model demo_expert --new-chat -o b")
    assert ip.user_ns["b"] == DEMO_ANSWERS["demo_expert"]
    history = "".join(ip.user_ns["In"]) + repr(magics(ip).session._leases)
    assert expert.api_key not in history


def test_param_passes_a_sampling_field_to_vllm(ip: InteractiveShell) -> None:
    """The demo fine-tune stops after a few tokens; vLLM's min_tokens, given with --param, makes it go on."""
    ask(ip, "--finetune-model demo_expert --new-chat --max-tokens 40 --param min_tokens=40 -o a")
    assert ip.user_ns["a"].metrics["completion_tokens"] == 40
    assert ip.user_ns["a"].startswith(DEMO_ANSWERS["demo_expert"])
    ask(ip, "--finetune-model demo_expert --new-chat -o b")
    assert ip.user_ns["b"] == DEMO_ANSWERS["demo_expert"] and ip.user_ns["b"].metrics["completion_tokens"] < 40


def test_switching_finetunes_keeps_the_server(ip: InteractiveShell, manager) -> None:
    ask(ip, "--finetune-model demo_expert -o a")
    pid = manager.registry.get(ip.user_ns["a"].metrics["server"]).pid
    ask(ip, "--finetune-model demo_poet --new-chat -o b")
    b = ip.user_ns["b"]
    assert b == DEMO_ANSWERS["demo_poet"]
    assert b.metrics["server"] == ip.user_ns["a"].metrics["server"]
    assert manager.registry.get(b.metrics["server"]).pid == pid


def test_compare_streams_three_models_of_one_server(ip: InteractiveShell) -> None:
    ask(ip, "--compare demo_expert,demo_poet,base -o c")
    c = ip.user_ns["c"]
    assert {name: str(reply) for name, reply in c.items()} == {
        "demo_expert": DEMO_ANSWERS["demo_expert"], "demo_poet": DEMO_ANSWERS["demo_poet"],
        "base": DEMO_ANSWERS[DEMO_BASE]}
    assert len({reply.metrics["server"] for reply in c.values()}) == 1
    final = ip.display_pub.outputs[-1]["data"]["text/html"]
    assert all(DEMO_ANSWERS[k] in final for k in ("demo_expert", "demo_poet", DEMO_BASE))
    assert magics(ip).session.history == []  # a comparison is not part of the conversation


def test_code_format_inserts_the_next_cell(ip: InteractiveShell) -> None:
    ask(ip, "--finetune-model demo_expert -f code")
    assert ip.rl_next_input == DEMO_ANSWERS["demo_expert"]


def test_history_and_reset_by_prompt_tokens(ip: InteractiveShell) -> None:
    tokens = []
    for line in ("", "", "%sage reset", "--new-chat"):
        if line.startswith("%"):
            ip.run_line_magic("sage", "reset")
            continue
        ask(ip, f"--finetune-model demo_expert -o a {line}")
        tokens.append(ip.user_ns["a"].metrics["prompt_tokens"])
    first, second, after_reset = tokens
    assert second > first and after_reset == first
    ip.run_line_magic("config", "SageMagics.max_history = 0")
    ask(ip, "--finetune-model demo_expert -o a")
    ask(ip, "--finetune-model demo_expert -o a")
    assert ip.user_ns["a"].metrics["prompt_tokens"] == first


def test_status_and_logs(ip: InteractiveShell, expert, capsys: pytest.CaptureFixture) -> None:
    ip.run_line_magic("sage", "status")
    assert expert.server_id in html_of(ip) and "demo_expert" in html_of(ip)
    ask(ip, "--finetune-model demo_expert")
    capsys.readouterr()
    ip.run_line_magic("sage", "logs -n 5")
    assert capsys.readouterr().out.strip()


def test_chat_widget_streams_off_the_main_thread(ip: InteractiveShell) -> None:
    widget = ip.run_line_magic("sage_chat", "--finetune-model demo_expert")
    seen: list[str] = []
    widget.session.subscribe(lambda e: seen.append(threading.current_thread().name) if e.kind == "delta" else None)
    done = widget.send(DEMO_PROMPT)
    assert done is not None and done.wait(120)
    assert DEMO_ANSWERS["demo_expert"] in widget.shown[-1].value
    assert seen and set(seen) == {"sage-chat"}
    assert widget.session is magics(ip).session and len(widget.session.history) == 2


def test_a_grounded_answer_cites_and_its_mark_keeps_the_passages_in_a_light_kernel(ip: InteractiveShell,
                                                                                   tmp_path) -> None:
    heavy_before = {m for m in HEAVY if m in sys.modules}
    doc = tmp_path / "notes.md"
    doc.write_text("# Keep-alive\n\nSAGE_KEEP_ALIVE sets how long a server outlives its last owner.\n")
    ip.run_line_magic("sage", f"index add magic-notes {doc}")
    ask(ip, "--finetune-model demo_expert --index magic-notes -o g", "What does SAGE_KEEP_ALIVE set?")
    g = ip.user_ns["g"]
    assert g.citations and g.citations[0]["source"].endswith("notes.md")
    assert "notes.md" in ip.display_pub.outputs[-1]["data"]["text/html"]
    mark = g.rate("bad")  # a grounded answer's mark keeps the passages the model was shown, to train on
    (row,) = [r for r in feedback_rows(FeedbackStore(magics(ip).session.settings.home)) if mark["id"] in r["marks"]]
    *before, question = row["messages"]
    assert any("outlives its last owner" in m["content"] for m in before)
    assert question == {"role": "user", "content": "What does SAGE_KEEP_ALIVE set?"}
    assert row["citations"][0]["source"].endswith("notes.md")
    assert {m for m in HEAVY if m in sys.modules} == heavy_before
    assert isinstance(magics(ip).session.search().__self__, SearchService)  # retrieval ran in the helper process


@pytest.mark.kernel
def test_a_cells_answer_is_its_value_and_is_drawn_once(settings, expert, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real kernel: Out[n] and _ hold the Reply (so {Out[n]} works on an answer), and the displayhook does
    not draw it a second time after the streamed display."""
    import nbformat
    from nbclient import NotebookClient

    from tests.conftest import env_for

    for key, value in env_for(settings).items():
        monkeypatch.setenv(key, value)
    answer = DEMO_ANSWERS["demo_expert"]
    cells = ["%load_ext sage_magic",
             f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT}",
             f"from sage_magic.chat.reply import Reply\nassert isinstance(Out[2], Reply) and _ is Out[2]\n"
             f"assert Out[2] == {answer!r} and Out[2].model == 'demo_expert'",
             "%%sage --finetune-model demo_expert --new-chat -o again\nSay this back: {Out[2]}",
             f"assert {answer!r} in again.prompt and '{{Out[2]}}' not in again.prompt"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()  # raises if an assert cell fails
    outputs = notebook.cells[1].outputs
    assert not [o for o in outputs if o.output_type in ("execute_result", "error")]
    shown = [o for o in outputs if answer in str(o.get("data", {}).get("text/html", ""))]
    assert len(shown) == 1 and shown[0].metadata["sage"]["model"] == "demo_expert"


def test_sage_error_explains_the_last_failed_cell_through_the_chat(ip: InteractiveShell) -> None:
    ip.run_cell("numbers = [1, 2]\nnumbers[5]", store_history=True)
    ip.run_cell("print('fine')", store_history=True)
    ip.run_line_magic("config", "SageMagics.update_interval = 0")
    result = ip.run_cell("%sage error --finetune-model demo_expert -o e", store_history=True)
    result.raise_error()
    e = ip.user_ns["e"]
    assert result.result is e and e.model == "demo_expert" and e.strip()
    assert "numbers[5]" in e.prompt and "IndexError: list index out of range" in e.prompt
    outputs = ip.display_pub.outputs
    assert len({o["transient"]["display_id"] for o in outputs}) == 1  # one display, updated as it streams
    assert e.text in outputs[-1]["data"]["text/plain"] and outputs[-1]["metadata"]["sage"]["model"] == "demo_expert"
    assert magics(ip).session.history[-2:] == [{"role": "user", "content": e.prompt},
                                               {"role": "assistant", "content": e.text}]


def _prewarmed(monkeypatch: pytest.MonkeyPatch, settings, names: str) -> InteractiveShell:
    """A shell loaded with SAGE_PREWARM=names, once its background prewarm has finished."""
    from tests.conftest import env_for, new_shell, wait_until

    for key, value in {**env_for(settings), "SAGE_PREWARM": names}.items():
        monkeypatch.setenv(key, value)
    shell = new_shell()
    assert wait_until(lambda: not any(t.name.startswith("sage-prewarm") for t in threading.enumerate()), 300)
    return shell


def test_a_prewarmed_finetune_answers_the_first_question_on_its_lease(settings, expert,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SAGE_PREWARM opened the lease while the notebook was idle: the first question uses it as it is (no
    manager call, no server start) and `%sage status` showed the server before anything was asked."""
    shell = _prewarmed(monkeypatch, settings, "demo_expert")
    try:
        session = magics(shell).session
        (lease,) = session._leases.values()
        assert lease.endpoint.server_id == expert.server_id
        shell.run_line_magic("sage", "status")
        assert expert.server_id in html_of(shell)
        assert ask(shell, "--finetune-model demo_expert -o a").result == DEMO_ANSWERS["demo_expert"]
        assert list(session._leases.values()) == [lease]
    finally:
        shell.extension_manager.unload_extension("sage_magic")
