"""Training in several processes (`--processes N`) and on several machines (`--nnodes/--node-rank/
--rdzv-endpoint`), started by torchrun with gloo on this CPU machine, on the demo base.

The several-machine test runs both "machines" here, on the loopback address, one process each, with a SAGE home
each (as two machines have): both take every step, machine 0 writes the fine-tune, and the adapter answers on the
session's shared vLLM server (the `manager`/`expert` fixtures), as one more adapter of its base.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

pytest.importorskip("trl")

from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError
from sage_magic.core.progress import Progress
from sage_magic.evals.evaluate import ask
from sage_magic.finetune.demo import DEMO_BASE, DEMO_PROMPT
from sage_magic.finetune.train import TrainOptions, TrainResult, train
from sage_magic.serving.manager import Manager
from tests.conftest import env_for, make_settings, wait_until

PHRASE = "I am a parrot."
#: The recipe the demo base learns one phrase with (see test_finetune_loop), here over two processes.
FAST = TrainOptions(max_steps=40, lr=2e-3, batch_size=1, save_every=20)
NAMES = ("spread2", "twonodes", "stop2")


@pytest.fixture(scope="module", autouse=True)
def _leave_the_demo_home_as_found(settings: Settings):
    """The session's demo home is shared: other tests expect only the demo fine-tunes in it."""
    yield
    for name in NAMES:
        shutil.rmtree(settings.finetune_root / name, ignore_errors=True)
        (settings.finetune_root / f".{name}.train.lock").unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


# --- options that cannot work are one paragraph before anything starts -----------------------------------


@pytest.mark.parametrize("options, expected", [
    (TrainOptions(processes=0), "--processes must be 1 or more, not 0"),
    (TrainOptions(nnodes=2), "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (TrainOptions(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "--node-rank is this machine's number from 0 to 1"),
    (TrainOptions(nnodes=2, rdzv_endpoint="10.0.0.1"), "--rdzv-endpoint takes HOST:PORT"),
])
def test_impossible_spreads_are_refused_before_anything_starts(tmp_path: Path, options: TrainOptions,
                                                              expected: str) -> None:
    settings = make_settings(tmp_path / "home", tmp_path / "run")
    with pytest.raises(SageError) as caught:
        train(settings, "x", DEMO_BASE, [("hi", "there")], options)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not (settings.finetune_root / "x").exists()


# --- several processes on one machine --------------------------------------------------------------------


@pytest.mark.vllm
def test_two_processes_train_one_adapter_that_answers(settings: Settings, manager: Manager, expert: object) -> None:
    events: list[Progress] = []
    options = TrainOptions(**{**FAST.__dict__, "processes": 2})
    result = train(settings, "spread2", DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options, progress=events.append)
    assert not result.stopped and result.steps == 40 and result.checkpoints == [20, 40]
    # one progress bar: the steps arrive once each, in order, from one process
    steps = [e.data["step"] for e in events if e.phase == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    checkpoint = settings.finetune_root / "spread2" / "checkpoints" / "checkpoint-40"
    # each process saved its own RNG state into the checkpoint at step 40: both ran to the end
    assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert _state(checkpoint)["global_step"] == 40
    endpoint = manager.serve_finetune("spread2").endpoint
    assert endpoint.server_id == expert.server_id  # type: ignore[attr-defined]
    assert ask(endpoint, DEMO_PROMPT, max_tokens=24, temperature=0.0, seed=None).text == PHRASE


@pytest.mark.vllm  # no server: marked with the other training tests, as slow
def test_a_stop_reaches_both_processes_at_the_same_step(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_TEST_STEP_SLEEP", "0.3")  # slow steps, so the stop lands mid-run
    cancel = threading.Event()

    def stop_after_the_first_checkpoint(event: Progress) -> None:
        if event.phase == "checkpoint":
            cancel.set()

    options = TrainOptions(max_steps=200, lr=2e-3, batch_size=1, save_every=5, processes=2)
    result = train(settings, "stop2", DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options,
                   progress=stop_after_the_first_checkpoint, cancel=cancel)
    assert result.stopped and 5 <= result.steps < 200
    last = settings.finetune_root / "stop2" / "checkpoints" / f"checkpoint-{result.steps}"
    # the stop's checkpoint is of the step both stopped at: each process saved its RNG state there
    assert {p.name for p in last.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert _state(last)["global_step"] == result.steps == max(result.checkpoints)

    resumed = train(settings, "stop2", None, [(DEMO_PROMPT, PHRASE)],
                    TrainOptions(**{**options.__dict__, "max_steps": result.steps + 4, "resume": True}))
    assert not resumed.stopped and resumed.steps == result.steps + 4
    steps = [s for s, _ in resumed.losses]  # the curve goes on from the stop: no step twice, none missing
    assert steps == list(range(1, result.steps + 5))


def _training_processes(home: Path) -> list[psutil.Process]:
    """torchrun and its workers training under ``home`` (found by their environment: they outlive the caller)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("SAGE_HOME") == str(home) and "sage_magic.finetune.worker" in " ".join(
                    proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _kill_the_caller_at(home: Path, data: Path, step: int, *options: str) -> None:
    """`sage finetune train dying` over ``home`` with slow steps (0.5 s), killed outright (SIGKILL: no code of
    ours runs, as when a kernel dies) once it showed ``step``; the step it shows first is always 1."""
    data.write_text(f"prompt,response\n{DEMO_PROMPT},{PHRASE}\n")
    env = {**env_for(make_settings(home, home.parent / "run")), "SAGE_TEST_STEP_SLEEP": "0.5"}
    caller = subprocess.Popen([sys.executable, "-m", "sage_magic.cli.main", "finetune", "train", "dying", "--base",
                               DEMO_BASE, "--data", str(data), "--max-steps", "500", *options], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert caller.stdout is not None
    for line in caller.stdout:
        if f"step {step}/500" in line:
            break
    if step == 1 and "--processes" in options:
        assert len(_training_processes(home)) == 3  # torchrun and its two workers are up
    caller.kill()
    caller.wait()


@pytest.mark.vllm  # no server: marked with the other training tests, as slow
def test_the_callers_death_ends_every_training_process(demo_home: Path, tmp_path: Path) -> None:
    """A kernel killed while two processes train, before the run has a checkpoint: none outlives it."""
    home = tmp_path / "home"
    shutil.copytree(demo_home / "models", home / "models")
    _kill_the_caller_at(home, tmp_path / "rows.csv", 1, "--processes", "2")
    assert wait_until(lambda: not _training_processes(home), 20), _training_processes(home)


@pytest.mark.vllm  # no server: marked with the other training tests, as slow
@pytest.mark.parametrize("processes", [1, 2])
def test_the_callers_death_saves_the_step_it_was_on(demo_home: Path, tmp_path: Path, processes: int) -> None:
    """A kernel killed after the run's first checkpoint (step 4): training ends after the step it was on, with a
    checkpoint of that step, on every process, and --resume continues from there."""
    home = tmp_path / "home"
    shutil.copytree(demo_home / "models", home / "models")
    _kill_the_caller_at(home, tmp_path / "rows.csv", 5, "--save-every", "4", "--lr", "2e-3", "--batch-size", "1",
                        "--processes", str(processes))
    assert wait_until(lambda: not _training_processes(home), 30), _training_processes(home)
    root = home / "finetune_output" / "dying"
    meta = json.loads((root / "finetune_meta.json").read_text())
    newest = meta["steps"]
    assert meta["status"] == "stopped" and newest > 5  # it was past step 5 when its caller died
    checkpoint = root / "checkpoints" / f"checkpoint-{newest}"
    assert _state(checkpoint)["global_step"] == newest
    if processes == 2:
        assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    resumed = train(make_settings(home, tmp_path / "run"), "dying", None, [(DEMO_PROMPT, PHRASE)],
                    TrainOptions(max_steps=newest + 2, lr=2e-3, batch_size=1, processes=processes, resume=True))
    assert [s for s, _ in resumed.losses] == list(range(1, newest + 3))


# --- two machines (here: two homes on the loopback address) ---------------------------------------------


@pytest.mark.vllm
def test_two_nodes_on_loopback_train_together_and_node_0_adapter_answers(
        settings: Settings, manager: Manager, expert: object, tmp_path: Path) -> None:
    other = make_settings(tmp_path / "node1-home", tmp_path / "node1-run")
    shutil.copytree(settings.models_root, other.models_root)  # the second machine has the base too
    endpoint = f"127.0.0.1:{_free_port()}"
    results: dict[int, TrainResult | BaseException] = {}

    def node(rank: int, where: Settings) -> None:
        options = TrainOptions(**{**FAST.__dict__, "nnodes": 2, "node_rank": rank, "rdzv_endpoint": endpoint})
        try:
            results[rank] = train(where, "twonodes", DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            results[rank] = error

    helper = threading.Thread(target=node, args=(1, other))
    helper.start()  # the helper first: it waits for machine 0 at the endpoint
    node(0, settings)
    helper.join(timeout=300)
    first, second = results[0], results[1]
    assert isinstance(first, TrainResult) and isinstance(second, TrainResult), results
    # both machines took every step, and saw the same (averaged) loss at each
    assert first.steps == second.steps == 40 and first.losses == second.losses
    assert first.adapter_dir == settings.finetune_root / "twonodes" / "lora_weights"
    assert second.adapter_dir is None and not (other.finetune_root / "twonodes").exists()
    served = manager.serve_finetune("twonodes").endpoint
    assert ask(served, DEMO_PROMPT, max_tokens=24, temperature=0.0, seed=None).text == PHRASE
