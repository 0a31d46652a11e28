"""The kernel session's lifetime and data: leases that outlive a retrain, one lease per key whoever asks at
once, every turn ending with an event, a transcript with every turn, replies that copy and pickle, and lease
keys without secrets.

Slow tests ask real vLLM: the shared `expert` server. The retrain's defect stopped a server whose ONLY lease
the session held; there the session's own leases are counted apart from the other owners'.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.chat.events import Event
from sage_magic.chat.reply import Reply
from sage_magic.chat.session import Session
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_ANSWERS_2, DEMO_PROMPT, DEMO_PROMPT_2
from sage_magic.notebook.panel import ChatWidget
from sage_magic.serving.registry import Registry
from tests.conftest import make_settings
from tests.test_magics import magics

SECRET = "sk-do-not-show-me-0123456789"
#: A --base-url with a typo in its port: the HTTP stack raises a plain ValueError, not a SageError.
BAD_URL = "http://127.0.0.1:99999/v1"


def _texts(panel: ChatWidget) -> str:
    return "\n".join(w.value for w in panel.shown)


# --- without a server -----------------------------------------------------------------------------------------


def test_a_reply_survives_copy_deepcopy_and_every_pickle_protocol() -> None:
    """`-o answer` then `%store answer`, `copy.deepcopy(answer)` or sending it to a multiprocessing worker."""
    reply = Reply("Roses are red.", model="demo_poet", prompt="Who are you?", cancelled=True,
                  citations=[{"n": 1, "source": "notes.md", "location": "# Intro", "score": 0.5, "text": "x"}],
                  metrics={"server": "abc", "prompt_tokens": 7, "ttft_s": 0.01})
    copies = [copy.copy(reply), copy.deepcopy(reply)]
    copies += [pickle.loads(pickle.dumps(reply, protocol)) for protocol in range(pickle.HIGHEST_PROTOCOL + 1)]
    for again in copies:
        assert type(again) is Reply and again == reply and again.text == "Roses are red."
        assert (again.model, again.prompt, again.citations, again.metrics, again.cancelled) == (
            reply.model, reply.prompt, reply.citations, reply.metrics, reply.cancelled)
    deep = copies[1]
    deep.citations[0]["n"] = 2
    assert reply.citations[0]["n"] == 1  # a deep copy owns its citations


def test_no_repr_of_the_session_shows_an_api_key(tmp_path: Path) -> None:
    session = Session(make_settings(tmp_path / "home", tmp_path / "run"))
    args = session.options(backend="openai", base_url="http://127.0.0.1:9/v1", model="remote", api_key=SECRET)
    lease = session.lease(args)
    session.client(lease.endpoint)
    assert session.lease(argparse.Namespace(**vars(args))) is lease  # still one cached lease per key
    other = session.lease(session.options(backend="openai", base_url="http://127.0.0.1:9/v1", model="remote",
                                          api_key=SECRET + "2"))
    assert other is not lease  # another key is another lease
    assert SECRET not in repr(session) and SECRET not in repr(vars(session))
    session.close()


def test_a_turn_that_fails_with_any_error_ends_with_a_failed_event(tmp_path: Path) -> None:
    session = Session(make_settings(tmp_path / "home", tmp_path / "run"))
    events: list[Event] = []
    session.subscribe(events.append)
    args = session.options(backend="openai", base_url=BAD_URL, model="fake")
    with pytest.raises(ValueError):
        session.ask("hello", args)
    assert [e.kind for e in events] == ["started", "failed"]
    assert isinstance(events[-1].data, ValueError) and session.running == {}


def test_a_panel_turn_that_fails_with_any_error_shows_it_instead_of_the_dots(tmp_path: Path) -> None:
    """A panel made from Python (`ChatWidget(session, options)`): `%sage_chat` itself asks the endpoint first."""
    session = Session(make_settings(tmp_path / "home", tmp_path / "run"))
    panel = ChatWidget(session, session.options(backend="openai", base_url=BAD_URL, model="fake"))
    done = panel.send("hello")
    assert done is not None and done.wait(30)
    last = panel.shown[-1].value
    assert "ValueError: Port out of range" in last and "…" not in last
    assert not panel.send_button.disabled and "failed" in panel.status.value
    panel.close()
    session.close()


# --- on the shared real server ------------------------------------------------------------------------------


@pytest.mark.vllm
def test_a_panel_and_a_cell_asking_at_once_share_one_lease(settings, expert) -> None:
    """The panel's worker thread and a `%%sage` cell open the same key at the same moment: one lease, released
    with the session (a second one used to be overwritten in the cache and kept the server forever)."""
    registry = Registry(settings.runtime_dir)
    before = {o.lease for o in registry.get(expert.server_id).owners}
    session = Session(settings)
    start = threading.Barrier(2)
    leases: list = []

    def open_lease() -> None:
        start.wait()
        leases.append(session.lease(session.options(finetune_model="demo_expert")))

    threads = [threading.Thread(target=open_lease) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(leases) == 2 and leases[0] is leases[1]
    assert len({o.lease for o in registry.get(expert.server_id).owners} - before) == 1
    session.close()
    assert {o.lease for o in registry.get(expert.server_id).owners} == before


@pytest.mark.vllm
def test_an_interrupted_turn_is_exported_and_shown_like_the_others(settings, expert, tmp_path: Path) -> None:
    session = Session(settings)
    events: list[Event] = []
    session.subscribe(events.append)
    args = session.options(finetune_model="demo_expert")
    try:
        with pytest.raises(KeyboardInterrupt):  # a kernel interrupt while the answer streams
            session.ask(DEMO_PROMPT, args, on_delta=lambda delta: signal.raise_signal(signal.SIGINT))
        partial = session.history[-1]["content"]
        assert partial and DEMO_ANSWERS["demo_expert"].startswith(partial)
        turn = session.transcript[-1]
        assert (turn["prompt"], turn["answer"], turn["cancelled"]) == (DEMO_PROMPT, partial, True)
        assert turn["model"] == "demo_expert" and turn["server"] == expert.server_id
        assert events[-1].kind == "cancelled" and events[-1].data == partial
        text = session.export(tmp_path / "chat.md").read_text()
        assert partial in text and "stopped by the user" in text
        panel = ChatWidget(session, args)  # a panel opened afterwards shows the turn, marked stopped
        assert partial in _texts(panel) and "stopped" in _texts(panel)
        panel.close()
    finally:
        session.close()


@pytest.mark.vllm
def test_a_new_panel_shows_only_the_conversation_since_the_last_reset(ip: InteractiveShell, tmp_path: Path) -> None:
    ip.run_cell(f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT}\n").raise_error()
    first = ip.run_line_magic("sage_chat", "--finetune-model demo_expert")
    first.clear_button.click()  # the model forgets the first turn
    ip.run_cell(f"%%sage --finetune-model demo_expert\n{DEMO_PROMPT_2}\n").raise_error()
    second = ip.run_line_magic("sage_chat", "--finetune-model demo_expert")
    assert DEMO_ANSWERS_2["demo_expert"] in _texts(second) and DEMO_ANSWERS["demo_expert"] not in _texts(second)
    ip.run_line_magic("sage", "reset")
    third = ip.run_line_magic("sage_chat", "--finetune-model demo_expert")
    assert third.shown == ()
    ip.run_line_magic("sage", f"export {tmp_path / 'chat.json'}")
    exported = json.loads((tmp_path / "chat.json").read_text())
    assert [t["prompt"] for t in exported] == [DEMO_PROMPT, DEMO_PROMPT_2]  # export keeps everything
    assert magics(ip).session.history == []
    for panel in (first, second, third):
        panel.close()


# --- a retrain while the fine-tune answers ----------------------------------------------------------------


@pytest.fixture
def retrained_name(settings, manager) -> Iterator[str]:
    """A copy of demo_expert under a new name in the shared home (this test "retrains" it, which other tests
    must not see); removed afterwards, and its adapter unloaded from the shared server."""
    name = f"retrain_{uuid.uuid4().hex[:8]}"
    shutil.copytree(settings.finetune_root / "demo_expert", settings.finetune_root / name,
                    ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    yield name
    if any(name in r.adapters for r in manager.registry.all()):
        from sage_magic.serving.servers import stop_target

        stop_target(manager.registry, name, settings.stop_grace)  # unloads only this adapter
    shutil.rmtree(settings.finetune_root / name)


@pytest.mark.vllm
def test_retraining_the_finetune_in_use_keeps_its_server_and_the_answer_streaming(settings, expert,
                                                                                  retrained_name: str) -> None:
    """Releasing the session's lease on retrain stopped the server when that lease was its only one (keep-alive
    0), broke the answer streaming at that moment, and made the next question wait for a cold start. On the
    shared server the session's own leases are told apart from the others' (as in the test above): it must
    hold one through the retrain, and exactly one afterwards."""
    name = retrained_name
    registry = Registry(settings.runtime_dir)
    before = {o.lease for o in registry.get(expert.server_id).owners}
    session = Session(settings)
    adapter = settings.finetune_root / name / "lora_weights" / "adapter_model.safetensors"
    retrained = settings.finetune_root / "demo_poet" / "lora_weights" / "adapter_model.safetensors"

    def own_leases(server: str) -> set[str]:
        return {o.lease for o in registry.get(server).owners} - before

    try:
        first = session.ask(DEMO_PROMPT, session.options(finetune_model=name))
        assert first.text == DEMO_ANSWERS["demo_expert"]
        server = first.metrics["server"]
        assert server == expert.server_id  # a fine-tune of the demo base: served by the shared base server
        pid = registry.get(server).pid
        leases_after_retrain: list[set[str]] = []

        def retrain_once(_delta: str) -> None:  # what `%sage finetune train NAME` does when it ends
            if not leases_after_retrain:
                shutil.copy(retrained, adapter)
                session.forget_finetune(name)
                leases_after_retrain.append(own_leases(server))

        long = session.options(finetune_model=name, max_tokens=96, params=[("min_tokens", 96)])
        streaming = session.ask("Tell me a long story about tensors.", long, on_delta=retrain_once)
        assert leases_after_retrain[0], "the retrain let go of the session's lease: as its only owner, it stops"
        assert not streaming.cancelled and streaming.metrics["completion_tokens"] == 96
        again = session.ask(DEMO_PROMPT, session.options(finetune_model=name), new_chat=True)
        assert again.text == DEMO_ANSWERS["demo_poet"]  # the new adapter, from the same server process
        assert again.metrics["server"] == server and registry.get(server).pid == pid
        assert len(own_leases(server)) == 1  # the old lease was let go once the new one was held
    finally:
        session.close()
    assert own_leases(expert.server_id) == set()
