"""The kernel session's lifetime and data: leases that outlive a retrain, one lease per key whoever asks at
once, replies that copy and pickle, and lease keys without secrets.

Slow tests ask real vLLM: the shared `expert` server, or (for the retrain) a server of their own, because
the defect there only shows when the session holds a server's ONLY lease.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import shutil
import threading
from pathlib import Path

import pytest

from sage_magic.chat.reply import Reply
from sage_magic.chat.session import Session
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT
from sage_magic.serving.registry import Registry
from tests.conftest import make_settings, sage_processes, wait_until

SECRET = "sk-do-not-show-me-0123456789"


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


# --- on a server of its own -------------------------------------------------------------------------------


@pytest.fixture
def own_home(demo_home: Path, tmp_path: Path) -> Path:
    """A copy of the demo home: this test "retrains" demo_expert, which other tests must not see."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, ignore=shutil.ignore_patterns("merged_model", ".merged_model*"))
    return home


@pytest.mark.vllm
def test_retraining_the_finetune_in_use_keeps_its_server_and_the_answer_streaming(own_home: Path,
                                                                                  short_runtime: Path) -> None:
    """The session holds the server's only lease (keep-alive 0): releasing it on retrain stopped the server,
    broke the answer streaming at that moment, and made the next question wait for a cold start."""
    settings = make_settings(own_home, short_runtime)
    registry = Registry(short_runtime)
    session = Session(settings)
    adapter = own_home / "finetune_output" / "demo_expert" / "lora_weights" / "adapter_model.safetensors"
    retrained = own_home / "finetune_output" / "demo_poet" / "lora_weights" / "adapter_model.safetensors"
    try:
        first = session.ask(DEMO_PROMPT, session.options(finetune_model="demo_expert"))
        assert first.text == DEMO_ANSWERS["demo_expert"]
        server = first.metrics["server"]
        pid = registry.get(server).pid
        owners_after_retrain: list = []

        def retrain_once(_delta: str) -> None:  # what `%sage finetune train demo_expert` does when it ends
            if not owners_after_retrain:
                shutil.copy(retrained, adapter)
                session.forget_finetune("demo_expert")
                owners_after_retrain.append(registry.get(server).owners)

        long = session.options(finetune_model="demo_expert", max_tokens=96, params=[("min_tokens", 96)])
        streaming = session.ask("Tell me a long story about tensors.", long, on_delta=retrain_once)
        assert owners_after_retrain[0], "the retrain left the server without an owner: it stops"
        assert not streaming.cancelled and streaming.metrics["completion_tokens"] == 96
        again = session.ask(DEMO_PROMPT, session.options(finetune_model="demo_expert"), new_chat=True)
        assert again.text == DEMO_ANSWERS["demo_poet"]  # the new adapter, from the same server process
        assert again.metrics["server"] == server and registry.get(server).pid == pid
        assert len(registry.get(server).owners) == 1  # the old lease was let go once the new one was held
    finally:
        session.close()
    assert wait_until(lambda: not registry.all() and not sage_processes(short_runtime), 30)
