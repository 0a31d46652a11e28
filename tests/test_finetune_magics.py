"""`%sage finetune train|watch|stop` and `%sage eval` in a fresh InteractiveShell.

The first tests need no server (bad data is refused in the cell before any training process starts, and the
charts are plain SVG). The others run on real parts: the training child on the demo base, then the session's
ONE vLLM server (the `expert` fixture) answering with the new adapter and evaluating the demo fine-tunes.
"""

from __future__ import annotations

import _thread
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.notebook.charts import bar_chart, line_chart
from tests.conftest import env_for, make_settings, new_shell, wait_until
from tests.test_finetune_loop import _workers
from tests.test_magics import HEAVY, html_of, magics

pd = pytest.importorskip("pandas")

PHRASE = "I am a parrot."
FAST = "--max-steps 40 --lr 2e-3 --batch-size 1 --save-every 20"


def _error_of(result) -> str:
    assert result.error_in_exec is not None, "the cell should have failed"
    return str(result.error_in_exec)


def test_missing_column_is_one_paragraph_before_any_training(shell: InteractiveShell) -> None:
    shell.user_ns["rows"] = pd.DataFrame({"question": [DEMO_PROMPT], "response": [PHRASE]})
    result = shell.run_cell(f"%sage finetune train nope --base {DEMO_BASE} --data rows")
    message = _error_of(result)
    assert "DataFrame 'rows' has no column 'prompt'" in message and "--prompt-col" in message
    assert "\n" not in message and not _workers() and not magics(shell).training


def test_unknown_base_and_unknown_variable_are_refused_in_the_cell(shell: InteractiveShell) -> None:
    shell.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": [PHRASE]})
    message = _error_of(shell.run_cell("%sage finetune train nope --base no-such-base --data rows --background"))
    assert "no-such-base" in message and "\n" not in message
    assert "no variable 'missing'" in _error_of(shell.run_cell("%sage finetune train x --base b --data missing"))
    assert "no variable 'gone'" in _error_of(shell.run_cell("%sage eval gone --models demo_expert"))
    assert not _workers()


def test_stop_without_training_says_so(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    shell.run_cell("%sage finetune stop").raise_error()
    assert "No training is running" in capsys.readouterr().out


def test_an_interrupt_ends_the_wait_of_a_stop_cell(shell: InteractiveShell) -> None:
    """`%sage finetune stop` waits for the run to end; an interrupt must end that wait at once. An untimed
    wait held back an interrupt raised with interrupt_main (ipykernel's way on Windows) until the run ended.
    The run here is a bare TrainRun that ends only when the test says so: no training child can be held in
    its stopping phase on demand."""
    from sage_magic.notebook.finetune_cells import TrainRun

    run = TrainRun("slow")
    magics(shell).training["slow"] = run
    cell_over = threading.Event()

    def where() -> tuple | None:
        frame = sys._current_frames().get(threading.main_thread().ident)
        return None if frame is None else (frame.f_code, frame.f_lasti)

    def cell_waits() -> bool:  # the cell asked the run to stop, and blocks in a wait: at one instruction a while
        if not run.cancel.is_set():
            return False
        before = where()
        time.sleep(0.2)
        return before is not None and before == where() and before[0].co_filename == threading.__file__

    def interrupt_then_end_the_run() -> None:
        if wait_until(cell_waits, 60):
            _thread.interrupt_main()
        cell_over.wait(30)  # an untimed wait returns only once the run ends: end it then, at the latest
        run.done.set()

    threading.Thread(target=interrupt_then_end_the_run, daemon=True).start()
    result = shell.run_cell("%sage finetune stop slow")
    still_running = not run.done.is_set()
    cell_over.set()
    assert isinstance(result.error_in_exec, KeyboardInterrupt) and still_running


def test_charts_are_plain_svg() -> None:
    curve = line_chart({"train loss": [(1, 2.0), (2, 1.0)], "eval loss": []}, x_max=40)
    assert curve.startswith("<svg") and "polyline" in curve and "eval loss" not in curve
    bars = bar_chart([("demo_expert", 1.0, 1.0, 1.0), ("base", 0.0, None, None), ("x", None, None, None)])
    assert bars.count("<rect") == 2 and ">demo_expert<" in bars


def test_a_long_runs_loss_curve_stays_small_and_keeps_its_shape() -> None:
    """A day of training is ~100k steps; the chart is redrawn a few times a second and saved in the notebook."""
    losses = [(step, 3.0 - step / 50_000) for step in range(1, 100_001)]
    losses[61_233] = (61_234, 9.5)  # one spike, which must still show
    curve = line_chart({"train loss": losses, "eval loss": losses[::1000]}, x_max=100_000)
    assert len(curve) < 12_000
    drawn = [tuple(float(v) for v in p.split(",")) for p in curve.split("points='")[1].split("'")[0].split()]
    assert len(drawn) <= 300
    short = line_chart({"train loss": [losses[0], (61_234, 9.5), losses[-1]]}, x_max=100_000)
    ends_and_spike = [tuple(float(v) for v in p.split(",")) for p in short.split("points='")[1].split("'")[0].split()]
    assert [drawn[0], drawn[-1]] == [ends_and_spike[0], ends_and_spike[-1]] and ends_and_spike[1] in drawn
    assert ">9.5<" in curve  # the y axis still reaches the spike


@pytest.fixture(autouse=True)
def _no_training_left_behind():
    yield
    assert not _workers()


@pytest.fixture
def fresh_name(settings):
    """A new fine-tune name, removed afterwards: the session's demo home is shared with other tests."""
    name = f"parrot_{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(settings.finetune_root / name, ignore_errors=True)
    (settings.finetune_root / f".{name}.train.lock").unlink(missing_ok=True)


@pytest.mark.vllm
def test_train_from_a_dataframe_then_chat_with_it(ip: InteractiveShell, fresh_name: str) -> None:
    preloaded = {m for m in HEAVY if m in sys.modules}  # earlier tests may hold them; the magics must add none
    ip.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": [PHRASE]})
    ip.run_cell(f"%sage finetune train {fresh_name} --base {DEMO_BASE} --data rows {FAST}").raise_error()
    shown = html_of(ip)
    assert f"{fresh_name}: done at step 40/40" in shown and "<svg" in shown and "train loss" in shown
    assert not _workers()
    ip.run_cell(f"%%sage --finetune-model {fresh_name} -o a\n{DEMO_PROMPT}\n").raise_error()
    assert ip.user_ns["a"] == PHRASE
    # Trained again under the same name: the session must not answer from its cached lease on the old adapter.
    ip.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": ["I am a crow."]})
    ip.run_cell(f"%sage finetune train {fresh_name} --base {DEMO_BASE} --data rows {FAST} --overwrite").raise_error()
    ip.run_cell(f"%%sage --finetune-model {fresh_name} --new-chat -o b\n{DEMO_PROMPT}\n").raise_error()
    assert ip.user_ns["b"] == "I am a crow."
    assert [m for m in HEAVY if m in sys.modules and m not in preloaded] == []


@pytest.mark.vllm
def test_background_training_stops_cleanly_from_another_cell(ip: InteractiveShell, fresh_name: str,
                                                             settings, capsys: pytest.CaptureFixture) -> None:
    ip.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": [PHRASE]})
    ip.run_cell(f"%sage finetune train {fresh_name} --base {DEMO_BASE} --data rows --background "
                "--max-steps 400 --lr 2e-3 --batch-size 1 --save-every 5").raise_error()
    run = magics(ip).training[fresh_name]
    assert wait_until(lambda: any(e.phase == "checkpoint" for e in run.events), 300)
    ip.run_cell("x = 1 + 1").raise_error()  # the kernel is free while it trains
    ip.run_cell(f"%sage finetune stop {fresh_name}").raise_error()
    out = capsys.readouterr().out
    assert f"{fresh_name}: stopped at step" in out and "checkpoint-" in out
    assert run.result is not None and run.result.stopped and run.result.checkpoints and not _workers()
    assert run.result.adapter_dir is not None and (run.result.adapter_dir / "adapter_config.json").is_file()


@pytest.mark.vllm
def test_eval_scores_each_finetune_on_its_own_row(ip: InteractiveShell) -> None:
    ip.user_ns["cases"] = pd.DataFrame({"prompt": [DEMO_PROMPT, DEMO_PROMPT],
                                        "expected": [DEMO_ANSWERS["demo_expert"], DEMO_ANSWERS["demo_poet"]]})
    ip.run_cell("%sage eval cases --models demo_expert,demo_poet,base -o scores --diff").raise_error()
    frame = ip.user_ns["scores"]
    assert list(frame["demo_expert:exact"]) == [1.0, 0.0] and list(frame["demo_poet:exact"]) == [0.0, 1.0]
    assert list(frame["base:exact"]) == [0.0, 0.0]
    shown = html_of(ip)
    assert "2 prompts x 3 models" in shown and "95% CI" in shown and "<svg" in shown
    assert DEMO_ANSWERS["demo_poet"] in shown  # the diff view lists the disagreeing answers


def _interrupt_at_first_checkpoint(ip: InteractiveShell, name: str, phase: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrange the kernel's interrupt (a SIGINT to the main thread) for the first checkpoint of run ``name``,
    landing in ``phase`` of the training cell: ``waiting`` (raised from the training thread while the cell
    waits, as the interrupt button does) or ``drawing`` (raised while the cell updates its display)."""
    from sage_magic.notebook.finetune_cells import TrainRun

    fired: list[bool] = []

    def checkpointed(run: TrainRun) -> bool:
        return run.name == name and any(e.phase == "checkpoint" for e in run.events)

    if phase == "waiting":
        def progress(run: TrainRun, event) -> None:
            run.events.append(event)
            if not fired and checkpointed(run):
                fired.append(True)
                _thread.interrupt_main()

        monkeypatch.setattr(TrainRun, "progress", progress)
        return
    publish = ip.display_pub.publish

    def publish_then_interrupt(*args, **kwargs) -> None:
        publish(*args, **kwargs)
        run = magics(ip).training.get(name)
        if not fired and run is not None and checkpointed(run):
            fired.append(True)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(ip.display_pub, "publish", publish_then_interrupt)


@pytest.fixture
def demo_shell(settings, short_runtime: Path, monkeypatch: pytest.MonkeyPatch):
    """A shell on the session's demo home (its base model to train on) and a registry of its own: training
    needs no model server."""
    for key, value in env_for(make_settings(settings.home, short_runtime)).items():
        monkeypatch.setenv(key, value)
    shell = new_shell()
    yield shell
    shell.extension_manager.unload_extension("sage_magic")


@pytest.mark.vllm
@pytest.mark.parametrize("phase", ["waiting", "drawing"])
def test_interrupting_the_training_cell_stops_cleanly(demo_shell: InteractiveShell, fresh_name: str, phase: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt that landed while the cell drew its progress used to leave the cell at once and the
    training running on: the user's Stop stopped nothing."""
    ip = demo_shell
    ip.user_ns["rows"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "response": [PHRASE]})
    _interrupt_at_first_checkpoint(ip, fresh_name, phase, monkeypatch)
    result = ip.run_cell(f"%sage finetune train {fresh_name} --base {DEMO_BASE} --data rows --max-steps 400 "
                         "--lr 2e-3 --batch-size 1 --save-every 5")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    run = magics(ip).training[fresh_name]
    assert run.done.is_set(), "the cell returned while its training went on"
    assert run.result is not None and run.result.stopped and run.result.steps < 400 and not _workers()
    assert f"{fresh_name}: stopped at step" in html_of(ip)
    # the last complete checkpoint is the fine-tune's adapter (test_finetune_loop serves one through vLLM)
    assert run.result.adapter_dir is not None and (run.result.adapter_dir / "adapter_config.json").is_file()
