"""`%sage eval` and `sage eval` keep what a run produced: an unwritable --save is refused before anything is
asked, a metric whose scorer fails is marked on its rows (the answers and other metrics stay), a save that
fails anyway is reported after the table, and an interrupt shows the partial table, then stops the notebook's
"Run all" (the CLI exits 130).

The first tests need no server (the save path is checked before any model is asked); the others run on the
session's one real vLLM server (the `expert` fixture), in-process, through the `sage` command and in a real kernel.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_magic.core.errors import SageError
from sage_magic.evals.evaluate import Item, evaluate
from sage_magic.finetune.demo import DEMO_ANSWERS, DEMO_PROMPT
from tests.conftest import env_for, make_settings
from tests.test_magics import html_of

pd = pytest.importorskip("pandas")

EXPERT = DEMO_ANSWERS["demo_expert"]


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("prompt", "expected"), *rows])
    return path


def _sage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_magic.cli.main", *args], env=env, capture_output=True,
                          text=True)


# --- item 2: a --save that cannot work is refused before anything is asked ---------------------------------


def test_eval_cell_refuses_an_unwritable_save_path_before_asking_anything(shell: InteractiveShell,
                                                                         tmp_path: Path) -> None:
    # The shell's home has no fine-tunes: had anything been asked, the error would be "no fine-tune demo_expert".
    shell.user_ns["cases"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "expected": [EXPERT]})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for save, problem in ((notes / "run.json", "is a file, not a folder"), (tmp_path, "that is a folder")):
        result = shell.run_cell(f"%sage eval cases --models demo_expert -o scores --save {save}")
        error = result.error_in_exec
        assert isinstance(error, SageError), error
        assert problem in str(error) and "--save" in str(error) and "\n" not in str(error)
    assert "scores" not in shell.user_ns and notes.read_text() == "mine"


def test_sage_eval_refuses_an_unwritable_save_path_before_asking_anything(tmp_path: Path) -> None:
    env = env_for(make_settings(tmp_path / "empty-home", tmp_path / "run"))
    data = _csv(tmp_path / "rows.csv", [(DEMO_PROMPT, EXPERT)])
    out = _sage("eval", str(data), "--models", "demo_expert", "--save", str(data / "run.json"), env=env)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()  # one paragraph, no progress: nothing was asked
    assert line.startswith("sage: Cannot save the results to") and "is a file, not a folder" in line


# --- item 2: a metric that cannot be computed is marked on its rows ----------------------------------------


@pytest.mark.vllm
def test_a_failing_embedding_child_keeps_the_answers_and_other_metrics(manager, expert, tmp_path: Path) -> None:
    rows = [Item(DEMO_PROMPT, EXPERT), Item(DEMO_PROMPT, DEMO_ANSWERS["demo_poet"])]
    result = evaluate(rows, ["demo_expert"], manager=manager, metrics=["exact", "embedding"],
                      python=str(tmp_path / "no-such-python"))
    answers = [row.answers["demo_expert"] for row in result.rows]
    assert [a.text for a in answers] == [EXPERT, EXPERT] and [a.scores["exact"] for a in answers] == [1.0, 0.0]
    for answer in answers:
        assert "embedding" not in answer.scores and "could not start" in answer.score_errors["embedding"]
    summary = {s.metric: s for s in result.summary()}
    assert (summary["exact"].scored, summary["exact"].failed, summary["exact"].mean) == (2, 0, 0.5)
    assert (summary["embedding"].scored, summary["embedding"].failed, summary["embedding"].mean) == (0, 2, None)
    (record, _) = result.records()
    assert record["demo_expert"] == EXPERT and record["demo_expert:exact"] == 1.0
    assert record["demo_expert:embedding"] is None and "embedding not scored" in record["demo_expert:error"]


@pytest.mark.vllm
def test_sage_eval_prints_and_saves_every_answer_when_the_embedder_is_missing(settings, expert,
                                                                             tmp_path: Path) -> None:
    data = _csv(tmp_path / "rows.csv", [(DEMO_PROMPT, EXPERT)])
    env = {**env_for(settings), "SAGE_EMBEDDER": str(tmp_path / "no-such-model")}
    out = _sage("eval", str(data), "--models", "demo_expert", "--metric", "exact", "--metric", "embedding",
                "--save", str(tmp_path / "run.json"), env=env)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]  # MODEL METRIC MEAN 95%-CI N FAILED ...
    assert ["demo_expert", "exact", "1.000", "[1.000,", "1.000]", "1", "0"] in [r[:7] for r in rows]
    assert ["demo_expert", "embedding", "-", "-", "0", "1"] in [r[:6] for r in rows]
    assert "embedding not scored for 1 answer: The embedding metric failed" in out.stdout
    assert "no-such-model" in out.stdout and f"Saved to {tmp_path / 'run.json'}" in out.stderr
    (saved,) = json.loads((tmp_path / "run.json").read_text())["rows"][0]["answers"].values()
    assert saved["text"] == EXPERT and saved["scores"] == {"exact": 1.0} and "embedding" in saved["score_errors"]


# --- item 2: a save that fails anyway comes after the table --------------------------------------------------


@pytest.mark.vllm
def test_a_save_that_fails_after_the_run_is_reported_after_the_table(ip: InteractiveShell, tmp_path: Path) -> None:
    ip.user_ns["cases"] = pd.DataFrame({"prompt": [DEMO_PROMPT], "expected": [EXPERT]})
    folder = tmp_path / "results"  # does not exist yet: the check before the run passes
    publish = ip.display_pub.publish

    def a_file_takes_the_folder_once_an_answer_is_in(data: dict, *args, **kwargs) -> None:
        if "eval: 1/1 requests" in data.get("text/plain", "") and not folder.exists():
            folder.write_text("someone else's file")
        publish(data, *args, **kwargs)

    ip.display_pub.publish = a_file_takes_the_folder_once_an_answer_is_in
    result = ip.run_cell(f"%sage eval cases --models demo_expert -o scores --save {folder / 'run.json'}")
    error = result.error_in_exec
    assert isinstance(error, SageError) and "could not be saved" in str(error) and "\n" not in str(error)
    assert list(ip.user_ns["scores"]["demo_expert"]) == [EXPERT]
    assert "1 prompts x 1 models" in html_of(ip) and "95% CI" in html_of(ip)
    assert folder.read_text() == "someone else's file"


# --- item 3: an interrupt keeps the partial results and stops "Run all" -------------------------------------


EVAL_CELL = """%sage eval cases --models demo_expert --concurrency 1 -o partial --save {save}"""
SETUP_CELL = """
%load_ext sage_magic
import pandas as pd
cases = pd.DataFrame({{"prompt": [{prompt!r}] * {rows}, "expected": [{expected!r}] * {rows}}})
"""


def _reply(client, msg_id: str, timeout: float) -> dict:
    while True:
        reply = client.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


@pytest.mark.vllm
@pytest.mark.kernel
def test_interrupting_an_eval_cell_shows_the_partial_table_and_stops_run_all(settings, expert,
                                                                            tmp_path: Path) -> None:
    from jupyter_client import KernelManager

    rows = 100  # one request at a time: the interrupt, sent when the first one is in, lands long before the last
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env_for(settings))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        setup = client.execute_interactive(SETUP_CELL.format(prompt=DEMO_PROMPT, expected=EXPERT, rows=rows),
                                           timeout=120)
        assert setup["content"]["status"] == "ok"
        # "Run all": both cells are queued at once; the second must not run once the first is interrupted
        evaluating = client.execute(EVAL_CELL.format(save=tmp_path / "partial.json"))
        after = client.execute("ran_after_the_eval = True")
        shown = ""
        interrupted = False
        while True:
            msg = client.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") != evaluating:
                continue
            if msg["msg_type"] in ("display_data", "update_display_data"):
                shown = msg["content"]["data"].get("text/plain", "")
                if not interrupted and "eval: " in shown and " requests" in shown:
                    km.interrupt_kernel()  # a row has finished: the kernel's interrupt button
                    interrupted = True
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = _reply(client, evaluating, 300)["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        assert "(interrupted: finished rows only)" in shown and "95% CI" in shown
        assert _reply(client, after, 60)["content"]["status"] == "aborted"
        outputs: list[dict] = []
        check = client.execute_interactive(
            "import json; print(json.dumps({'ran_after': 'ran_after_the_eval' in globals(), "
            "'answered': int(partial['demo_expert'].notna().sum()), "
            "'not_run': int((partial['demo_expert:error'] == 'not run (interrupted)').sum())}))",
            timeout=60, output_hook=outputs.append)
        assert check["content"]["status"] == "ok"
        state = json.loads("".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream"))
        assert state["ran_after"] is False
        assert state["answered"] >= 1 and state["not_run"] >= 1 and state["answered"] + state["not_run"] == rows
        saved = json.loads((tmp_path / "partial.json").read_text())
        assert saved["cancelled"] is True and len(saved["rows"]) == rows
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=False)


@pytest.mark.vllm
def test_sage_eval_interrupted_prints_the_partial_table_and_exits_130(settings, expert, tmp_path: Path) -> None:
    data = _csv(tmp_path / "rows.csv", [(DEMO_PROMPT, EXPERT)] * 100)
    proc = subprocess.Popen([sys.executable, "-m", "sage_magic.cli.main", "eval", str(data), "--models",
                             "demo_expert", "--concurrency", "1", "--save", str(tmp_path / "partial.json")],
                            env=env_for(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # plain progress lines (not a TTY)
            if "eval: " in line and " requests" in line:
                proc.send_signal(signal.SIGINT)  # Ctrl-C once a row has finished
                break
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "100 prompts x 1 models" in stdout and "(interrupted: finished rows only)" in stdout
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert saved["cancelled"] is True and 1 <= len([r for r in saved["rows"] if r["answers"]]) < 100
