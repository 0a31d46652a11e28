"""Controlling a training run on real parts (the training child on the demo base, no vLLM server): what an
--overwrite, a stop, a crash, a slow step, `watch` and `stop --now` leave behind.

Marked ``vllm`` like test_finetune_loop.py: each test loads torch in a training child, which is too slow for
the fast suite. Slow steps come from the worker's test hook SAGE_TEST_STEP_SLEEP (seconds slept per step),
which stands for a 1B+ model on CPU.
"""

from __future__ import annotations

import _thread
import dataclasses
import hashlib
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError
from sage_magic.core.progress import Progress
from sage_magic.core.staging import leftovers
from sage_magic.finetune import train as train_module
from sage_magic.finetune.catalog import get_finetune, list_finetunes
from sage_magic.finetune.demo import DEMO_BASE, DEMO_PROMPT
from sage_magic.finetune.train import TrainOptions, train

from .conftest import env_for, new_shell, wait_until
from .test_finetune_loop import _workers
from .test_magics import magics

pd = pytest.importorskip("pandas")
pytestmark = pytest.mark.vllm

PHRASE = "I am a parrot."
#: Long enough that every test stops or kills the run long before its end.
LONG = TrainOptions(max_steps=400, lr=2e-3, batch_size=1, save_every=50)


@pytest.fixture(name="name")
def finetune_name(settings: Settings) -> Iterator[str]:
    """A new fine-tune name, removed afterwards with its hidden siblings: the demo home is shared (the training
    tests of test_finetune_options use it too)."""
    fresh = f"ft_{uuid.uuid4().hex[:8]}"
    yield fresh
    root = settings.finetune_root / fresh
    for folder in [root, *leftovers(root)]:
        shutil.rmtree(folder, ignore_errors=True)
    (settings.finetune_root / f".{fresh}.train.lock").unlink(missing_ok=True)
    assert not _workers()


@pytest.fixture
def demo_shell(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """A shell on the demo home, with a registry no server is started in (nothing here asks for one)."""
    for key, value in env_for(settings).items():
        monkeypatch.setenv(key, value)
    shell = new_shell()
    yield shell
    for run in magics(shell).training.values():  # a failed test must not leave its training running
        run.kill.set()
        run.done.wait(60)
    shell.extension_manager.unload_extension("sage_magic")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_stopped_before_its_first_checkpoint_leaves_the_old_finetune(settings: Settings,
                                                                               name: str) -> None:
    old = settings.finetune_root / name
    shutil.copytree(settings.finetune_root / "demo_expert", old)
    before = _digest(old)
    servable_meanwhile = []
    cancel = threading.Event()

    def stop_at_first_step(event: Progress) -> None:
        if event.phase == "train" and not cancel.is_set():
            servable_meanwhile.append(get_finetune(settings, name).adapter_dir)
            cancel.set()

    result = train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)],
                   dataclasses.replace(LONG, overwrite=True), progress=stop_at_first_step, cancel=cancel)
    assert result.stopped and result.adapter_dir is None and not result.checkpoints
    assert servable_meanwhile == [old / "lora_weights"]  # the old adapter was there while the new one trained
    assert _digest(old) == before and not leftovers(old)
    assert next(e for e in list_finetunes(settings) if e.name == name).problem is None


def test_a_crash_before_the_first_checkpoint_leaves_nothing_a_retrain_refuses(settings: Settings,
                                                                              name: str) -> None:
    def crash_at_first_step(event: Progress) -> None:
        if event.phase == "train":
            for worker in _workers():
                worker.kill()

    with pytest.raises(SageError, match="failed: the training process exited with status -9"):
        train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)], LONG, progress=crash_at_first_step)
    assert name not in [e.name for e in list_finetunes(settings)]
    again = train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)],
                  TrainOptions(max_steps=2, lr=2e-3, batch_size=1, save_every=1))
    assert not again.stopped and again.adapter_dir == settings.finetune_root / name / "lora_weights"
    assert not leftovers(settings.finetune_root / name)  # the crashed run's staging folder was swept


def test_a_stop_waits_for_a_step_slower_than_the_least_grace(settings: Settings, name: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 2 s against a least grace of 1 s: the stop must scale with the step time, not kill."""
    monkeypatch.setattr(train_module, "STOP_GRACE", 1.0)
    monkeypatch.setenv("SAGE_TEST_STEP_SLEEP", "2")
    cancel = threading.Event()

    def stop_after_first_checkpoint(event: Progress) -> None:
        if event.phase == "checkpoint":
            cancel.set()

    result = train(settings, name, DEMO_BASE, [(DEMO_PROMPT, PHRASE)],
                   TrainOptions(max_steps=400, lr=2e-3, batch_size=1, save_every=1),
                   progress=stop_after_first_checkpoint, cancel=cancel)
    assert result.stopped and result.checkpoints and result.steps >= 1
    assert get_finetune(settings, name).adapter_dir == result.adapter_dir
    assert (settings.finetune_root / name / "finetune_meta.json").read_text().count('"stopped"') == 1


def test_interrupting_watch_detaches_and_stop_now_kills(demo_shell: InteractiveShell, name: str, settings: Settings,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SAGE_TEST_STEP_SLEEP", "1")
    demo_shell.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": [PHRASE]})
    demo_shell.run_cell(f"%sage finetune train {name} --base {DEMO_BASE} --data rows --background "
                        "--max-steps 400 --lr 2e-3 --batch-size 1 --save-every 1").raise_error()
    run = magics(demo_shell).training[name]

    def interrupt_once_it_trains() -> None:  # what the kernel's interrupt button does to the watching cell
        wait_until(lambda: any(e.phase == "train" for e in run.events), 300)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_it_trains, daemon=True).start()
    demo_shell.run_cell(f"%sage finetune watch {name}").raise_error()
    out = capsys.readouterr().out
    assert f"Stopped watching {name}; it goes on training" in out and f"%sage finetune stop {name}" in out
    assert not run.cancel.is_set() and not run.done.is_set()
    steps = len([e for e in run.events if e.phase == "train"])
    assert wait_until(lambda: len([e for e in run.events if e.phase == "train"]) > steps, 120)  # still training

    demo_shell.run_cell(f"%sage finetune stop --now {name}").raise_error()
    out = capsys.readouterr().out
    assert f"{name}: failed: Training {name!r} was killed" in out and "--resume" in out
    assert run.done.is_set() and not _workers()
    assert get_finetune(settings, name).checkpoints  # what was saved before the kill is kept
    assert not leftovers(settings.finetune_root / name)


def test_watch_and_stop_without_a_name_report_a_background_failure(demo_shell: InteractiveShell, name: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    demo_shell.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": [PHRASE * 3]})
    demo_shell.run_cell(f"%sage finetune train {name} --base {DEMO_BASE} --data rows --background "
                        "--max-length 12").raise_error()
    run = magics(demo_shell).training[name]
    assert run.done.wait(300) and run.error is not None  # the child refuses the row after the cell returned
    capsys.readouterr()
    for command in ("watch", "stop"):
        demo_shell.run_cell(f"%sage finetune {command}").raise_error()
        out = capsys.readouterr().out
        assert "No training is running in this kernel." in out
        assert f"{name}: failed: Row 1 is" in out and "more than --max-length 12" in out
