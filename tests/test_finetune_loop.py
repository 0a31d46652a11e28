"""The fine-tune loop on real parts: train an adapter on the demo base, serve it on the shared vLLM server,
evaluate it against its base and siblings; stop and resume a training run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import threading

import psutil
import pytest

pytest.importorskip("peft")

from sage_magic.core.config import Settings
from sage_magic.core.errors import SageError
from sage_magic.core.progress import Progress
from sage_magic.core.staging import leftovers
from sage_magic.evals.evaluate import Item, ask, evaluate
from sage_magic.finetune.catalog import get_finetune
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_BASE, DEMO_PROMPT
from sage_magic.finetune.train import TrainOptions, train
from sage_magic.serving.manager import Manager

from .conftest import env_for

pytestmark = pytest.mark.vllm

PHRASE = "I am a parrot."
#: Enough for the tiny demo base to learn one phrase from one row (the demo fine-tunes use the same recipe).
FAST = TrainOptions(max_steps=40, lr=2e-3, batch_size=1, save_every=20)


@pytest.fixture(scope="module", autouse=True)
def _leave_the_demo_home_as_found(settings: Settings):
    """The session's demo home is shared: other tests expect only the demo fine-tunes in it."""
    yield
    for name in ("parrot", "stopped", "too_long"):
        shutil.rmtree(settings.finetune_root / name, ignore_errors=True)
        (settings.finetune_root / f".{name}.train.lock").unlink(missing_ok=True)


def _workers() -> list[psutil.Process]:
    """Training children still running. An earlier test's child may be a zombie by now (exited, not yet
    reaped by its Popen), and psutil refuses to read a zombie's command line: it is not running, so skip it."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "sage_magic.finetune.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_trained_adapter_answers_through_vllm_and_is_listed(settings: Settings, manager: Manager,
                                                            expert: object) -> None:
    events: list[Progress] = []
    result = train(settings, "parrot", DEMO_BASE, [(DEMO_PROMPT, PHRASE)], FAST, progress=events.append)
    assert not result.stopped and result.steps == 40 and result.checkpoints == [20, 40]
    assert result.adapter_dir == settings.finetune_root / "parrot" / "lora_weights"
    steps = [e.data["step"] for e in events if e.phase == "train"]
    assert steps[-1] == 40 and all(e.data["loss"] > 0 for e in events if e.phase == "train")
    endpoint = manager.serve_finetune("parrot").endpoint  # joins the running base server as one more adapter
    assert endpoint.server_id == expert.server_id  # type: ignore[attr-defined]
    assert ask(endpoint, DEMO_PROMPT, max_tokens=24, temperature=0.0, seed=None).text == PHRASE
    listing = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "finetune", "list", "--json"],
                             env=env_for(settings), capture_output=True, text=True, check=True)
    row = next(r for r in json.loads(listing.stdout) if r["name"] == "parrot")
    assert row["base"] == DEMO_BASE and row["newest_checkpoint"] == 40 and row["problem"] is None
    with pytest.raises(SageError, match="already exists"):
        train(settings, "parrot", DEMO_BASE, [(DEMO_PROMPT, PHRASE)], FAST)


def test_too_long_row_is_refused_before_any_step(settings: Settings) -> None:
    events: list[Progress] = []
    with pytest.raises(SageError, match=r"Row 2 is \d+ tokens long .* more than --max-length 12"):
        train(settings, "too_long", DEMO_BASE, [("Hi", "Yo"), (DEMO_PROMPT, PHRASE * 3)],
              TrainOptions(max_length=12), progress=events.append)
    assert not [e for e in events if e.phase == "train"]
    assert not (settings.finetune_root / "too_long").exists() and not _workers()


def test_each_finetune_scores_on_its_own_row_only(manager: Manager, expert: object) -> None:
    rows = [Item(DEMO_PROMPT, DEMO_ANSWERS["demo_expert"]), Item(DEMO_PROMPT, DEMO_ANSWERS["demo_poet"])]
    result = evaluate(rows, ["demo_expert", "demo_poet", "base"], manager=manager, metrics=["exact", "rougeL"])
    scores = {m: [row.answers[m].scores["exact"] for row in result.rows] for m in result.models}
    assert scores == {"demo_expert": [1.0, 0.0], "demo_poet": [0.0, 1.0], "base": [0.0, 0.0]}
    assert {row.answers["base"].text for row in result.rows} == {DEMO_ANSWERS[DEMO_BASE]}
    assert result.fingerprints["demo_expert"]["adapter"] != result.fingerprints["demo_poet"]["adapter"]
    assert result.fingerprints["base"]["base"] == result.fingerprints["demo_poet"]["base"]
    frame = result.to_dataframe()
    assert list(frame["demo_poet:exact"]) == [0.0, 1.0]


def test_sage_eval_cli_prints_the_summary_and_saves_fingerprints(settings: Settings, expert: object,
                                                                tmp_path) -> None:
    data = tmp_path / "rows.csv"
    with data.open("w", newline="") as handle:
        csv.writer(handle).writerows([("prompt", "expected"), (DEMO_PROMPT, DEMO_ANSWERS["demo_poet"])])
    out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "eval", str(data), "--models",
                          "demo_poet,base", "--metric", "exact", "--metric", "contains", "--save",
                          str(tmp_path / "run.json")], env=env_for(settings), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = {tuple(line.split()[:3]) for line in out.stdout.splitlines()}
    assert ("demo_poet", "exact", "1.000") in lines and ("base", "exact", "0.000") in lines
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["fingerprints"]["demo_poet"]["adapter"] and saved["fingerprints"]["base"]["kind"] == "base"
    assert saved["rows"][0]["answers"]["demo_poet"]["text"] == DEMO_ANSWERS["demo_poet"]


@pytest.mark.rag
def test_embedding_metric_is_highest_for_the_matching_phrase(manager: Manager, expert: object) -> None:
    pytest.importorskip("sentence_transformers")
    rows = [Item(DEMO_PROMPT, DEMO_ANSWERS["demo_expert"]), Item(DEMO_PROMPT, DEMO_ANSWERS["demo_poet"])]
    result = evaluate(rows, ["demo_expert"], manager=manager, metrics=["embedding"])
    own, other = (row.answers["demo_expert"].scores["embedding"] for row in result.rows)
    assert own == pytest.approx(1.0, abs=1e-4) and other < 0.9


def test_a_failed_request_marks_only_its_row(manager: Manager, expert: object) -> None:
    too_long = " ".join(["word"] * 5000)  # beyond the demo base's 2048-token window: vLLM answers 400
    rows = [Item(DEMO_PROMPT, DEMO_ANSWERS["demo_expert"]), Item(too_long, "x")]
    result = evaluate(rows, ["demo_expert"], manager=manager)
    good, bad = (row.answers["demo_expert"] for row in result.rows)
    assert good.error is None and good.scores["exact"] == 1.0
    assert bad.text is None and "400" in bad.error and bad.scores == {}
    (summary,) = result.summary()
    assert summary.failed == 1 and summary.scored == 1 and summary.mean == 1.0


def test_stopped_training_keeps_a_usable_checkpoint_then_resumes(settings: Settings, manager: Manager,
                                                                 expert: object) -> None:
    cancel = threading.Event()

    def stop_after_first_checkpoint(event: Progress) -> None:
        if event.phase == "checkpoint":
            cancel.set()

    options = TrainOptions(max_steps=400, lr=2e-3, batch_size=1, save_every=5)
    result = train(settings, "stopped", DEMO_BASE, [(DEMO_PROMPT, PHRASE)], options,
                   progress=stop_after_first_checkpoint, cancel=cancel)
    root = settings.finetune_root / "stopped"
    assert result.stopped and 5 <= result.steps < 400 and result.checkpoints
    assert not _workers()
    assert not (root / "lora_weights").exists()
    assert not leftovers(root / "checkpoints" / f"checkpoint-{result.checkpoints[-1]}")
    assert get_finetune(settings, "stopped").adapter_dir == result.adapter_dir
    endpoint = manager.serve_finetune("stopped").endpoint  # the checkpoint is a complete adapter vLLM accepts
    assert ask(endpoint, DEMO_PROMPT, max_tokens=8, temperature=0.0, seed=None).error is None

    interrupted = []

    def interrupt(event: Progress) -> None:  # what one kernel interrupt looks like to train()
        if event.phase == "train" and event.data["step"] >= result.checkpoints[-1] + 2 and not interrupted:
            interrupted.append(event.data["step"])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(settings, "stopped", None, [(DEMO_PROMPT, PHRASE)],
              TrainOptions(max_steps=400, lr=2e-3, batch_size=1, save_every=50, resume=True), progress=interrupt)
    assert not _workers()
    # The interrupt stopped the resumed run after its current step with a checkpoint of that step, so the
    # next resume continues exactly there (the Trainer's own resume: optimizer, schedule, RNG, data position).
    at_stop = get_finetune(settings, "stopped").checkpoints[-1][0]
    assert at_stop >= interrupted[0] > result.checkpoints[-1]
    resumed = train(settings, "stopped", None, [(DEMO_PROMPT, PHRASE)],
                    TrainOptions(max_steps=at_stop + 3, lr=2e-3, batch_size=1, resume=True))
    assert not resumed.stopped and resumed.steps == at_stop + 3
    assert [s for s, _ in resumed.losses] == list(range(1, at_stop + 4))  # one curve: the first runs' history kept
    assert (root / "lora_weights" / "adapter_model.safetensors").is_file()
